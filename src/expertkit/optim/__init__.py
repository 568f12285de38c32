"""expertkit.optim: optimizers beyond torch.optim, registered in ``expertkit.train.OPTIMIZERS``.

* :mod:`expertkit.optim.zo`: zeroth-order fine-tuning (ZO-Bench): MeZO's ZO-SGD, sign,
  momentum, conservative, ZO-Adam, forward gradients; block-wise, hybrid and sparse variants.
* :mod:`expertkit.optim.newton`: Newton and Q-Newton (classical/quantum solver scheduler; the
  quantum solver is a cost model, every solve runs classically).
"""

from expertkit.optim import newton, zo  # noqa: F401  (registers the methods)
