"""memfit: train and fine-tune language models on hardware too small for comfort.

Plan the job against a budget, survive OOM / interruption / deadlines / full disks, resume exactly.
Heavy imports (torch, transformers) happen inside the functions that need them so `memfit --help`
stays fast.
"""

__version__ = "0.1.0"


def fit(*args, **kwargs):
    """Train any nn.Module with memfit's loop (see memfit.api.fit)."""
    from memfit.api import fit as _fit
    return _fit(*args, **kwargs)
