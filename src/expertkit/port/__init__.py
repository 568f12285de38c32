"""PortLLM: training-free patches made on an old base, carried to the evolved base.

* :func:`extract_patch`: a patch from a PEFT adapter or a fine-tuned folder minus its base;
* :func:`port`: apply it to a new base (a model folder or a PEFT adapter), after checking
  compatibility and measuring how far the base moved (:func:`diagnose`);
* :func:`evolve`: continue pretraining a base on another corpus, to make a "version 2".
"""

from expertkit.port.apply import PortResult, extract_patch, port
from expertkit.port.diagnose import PortDiagnosis, diagnose
from expertkit.port.evolve import EvolveResult, evolve

__all__ = ["EvolveResult", "PortDiagnosis", "PortResult", "diagnose", "evolve", "extract_patch", "port"]
