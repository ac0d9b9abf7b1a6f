"""Model code imported once, on one thread, before any worker thread can need it.

transformers' lazy module imports are not thread-safe: two worker threads importing model
code for the first time at once (the block loader and a generation's head/tokenizer load,
when a request arrives while the agent still loads) gave `ImportError: cannot import name
'AutoConfig'`, then the block build failed with "Cannot copy out of meta tensor" and the
agent died. So every worker-thread load of model code (blocks, head, tokenizer) holds
LOAD_LOCK and starts with import_model_code: whichever comes first imports everything the
loaders need, on its one thread, and no two threads ever import model code at once.
"""

from __future__ import annotations

import threading

# Held by every worker-thread load of model code (blocks, head, tokenizer).
LOAD_LOCK = threading.Lock()


def import_model_code(model_type: str | None = None) -> None:
    """Import torch, transformers' pieces the loaders use and, given a model type, its
    configuration and modeling modules. Hold LOAD_LOCK (or call before any worker starts)."""
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    from safetensors import safe_open  # noqa: F401
    from transformers import (  # noqa: F401
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoTokenizer,
        DynamicCache,
        PreTrainedTokenizerFast,
    )

    import agent.model.blocks
    import agent.model.head  # noqa: F401

    if model_type:
        from agent.model.families import family_for, modeling_module

        try:
            family_for(model_type)
        except KeyError:
            return  # an unsupported family fails later, with its own clear message
        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING[model_type]  # imports configuration_<type>
        MODEL_FOR_CAUSAL_LM_MAPPING.get(config_class, None)  # and the causal LM class
        modeling_module(model_type)
