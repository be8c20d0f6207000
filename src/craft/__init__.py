"""craft-tune: contrastive (CRAFT) and steering (Control Adapter) fine-tuning of causal language models.

The top level exports the public API of contrastive-ft 0.4.3 (its ``__all__``, below), each name also at the
module path it had there (``craft.losses.InfoNCELoss``, ...). Names are imported on first use, so
``import craft`` stays light (no torch / transformers / TRL until a name needs them). A name whose TRL class the
installed TRL lacks (``CRAFTPPOTrainer`` on TRL 1.x) raises an ImportError saying why when it is imported, and is
left out of ``from craft import *``.
"""

__version__ = "0.1.0"

# name -> module, in contrastive-ft 0.4.3's order
_EXPORTS = {
    **dict.fromkeys(("InfoNCELoss", "ProjectionHead", "pool_hidden_states"), "losses"),
    **dict.fromkeys(("CRAFTConfigMixin", "CRAFTSFTConfig", "CRAFTORPOConfig", "CRAFTGRPOConfig", "CRAFTPPOConfig",
                     "CRAFTDPOConfig", "CRAFT_PRESETS", "get_preset", "auto_configure"), "config"),
    **dict.fromkeys(("CRAFTDatasetBundle", "CRAFTCollator", "CRAFTMixedDataLoader", "make_craft_datasets"), "data"),
    **dict.fromkeys(("compute_contrastive_accuracy", "compute_representation_consistency",
                     "update_representation_reference"), "metrics"),
    **dict.fromkeys(("CRAFTSFTTrainer", "CRAFTORPOTrainer", "CRAFTGRPOTrainer", "CRAFTPPOTrainer", "CRAFTDPOTrainer",
                     "CRAFTTrainerMixin"), "trainers"),
    **dict.fromkeys(("CRAFTGradientAccumulator", "AccumulationScales", "compute_batch_distribution"), "accumulator"),
    **dict.fromkeys(("LastHiddenStateHook", "get_backbone"), "hooks"),
    **dict.fromkeys(("GradCacheContrastiveLoss", "GradCacheConfig", "CachedEmbeddingBank"), "gradcache"),
    **dict.fromkeys(("GradientBalancer", "LossScaleBalancer", "UncertaintyWeightingBalancer", "GradNormBalancer",
                     "PCGradBalancer", "create_gradient_balancer"), "gradient_balancing"),
}


def _available(name: str) -> bool:
    try:
        __getattr__(name)
    except ImportError:
        return False
    return True


def __getattr__(name: str):
    if name == "__all__":  # computed on `from craft import *`: only the names the installed TRL can provide
        return [n for n in _EXPORTS if _available(n)]
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
