"""expertkit.optim: optimizers beyond torch.optim, registered in ``expertkit.train.OPTIMIZERS``.

* :mod:`expertkit.optim.zo`: zeroth-order fine-tuning (ZO-Bench): MeZO's ZO-SGD, sign,
  momentum, conservative, ZO-Adam, forward gradients; block-wise, hybrid and sparse variants.
"""

from expertkit.optim import zo  # noqa: F401  (registers the methods)
