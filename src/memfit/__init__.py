"""memfit: train and fine-tune language models on hardware too small for comfort.

Plan the job against a budget, survive OOM / interruption / deadlines / full disks, resume exactly.
Heavy imports (torch, transformers) happen inside the functions that need them so `memfit --help`
stays fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`memfit.fit` is memfit.api.fit itself (so help() shows its real signature and docstring),
    imported on first use: `import memfit` stays free of torch."""
    if name == "fit":
        from memfit.api import fit
        return fit
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")


__all__ = ["fit"]
