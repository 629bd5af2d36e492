"""Model merging: linear interpolation of base and fine-tuned weights (LM-Cocktail style).

``merged = w * fine_tuned + (1 - w) * base`` for every floating-point tensor the two share; everything else
(tokenizer, pooling, config, buffers that are not floats, and a layer fine-tuning appended, such as the frozen
Matryoshka rotation) from the fine-tuned folder. Fine-tuning moves weights away from the
base; pulling part of the way back keeps most of the domain gain while restoring general-domain behaviour
(Xiao et al., "LM-Cocktail", 2023). The mixing weight is chosen by :func:`embed_assets.stages.evaluate.choose_model`
on the validation split and the forgetting guard, never on the test queries.

Custom code because neither sentence-transformers nor transformers ships a weight interpolation; it is a dozen
lines over ``state_dict()``, and FlagEmbedding's LM-Cocktail package would pull a second model zoo in for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def interpolate(base_model: str, finetuned_dir: str | Path, weight: float, out_dir: str | Path) -> Path:
    """Write the sentence-transformers folder whose weights are ``weight`` fine-tuned + ``1 - weight`` base.

    Args:
        base_model: The base model (folder, ``bundled:`` name or hub id).
        finetuned_dir: The fine-tuned sentence-transformers folder (same architecture as the base).
        weight: Share of the fine-tuned weights, in [0, 1] (1: the fine-tuned model, 0: the base).
        out_dir: Where to save the merged model (replaced if it exists).

    Returns:
        ``out_dir`` as a ``Path``. The fine-tuned folder's model card comes along, stating the merge.

    Raises:
        ValueError: ``weight`` outside [0, 1], the base has a tensor the fine-tuned model lacks, or a shared tensor's
            shape differs.
    """
    import torch

    from embed_assets.models import load_sentence_transformer

    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"merge weight {weight} is outside [0, 1]")
    tuned = load_sentence_transformer(str(finetuned_dir), device="cpu")
    base_state = load_sentence_transformer(base_model, device="cpu").state_dict()
    tuned_state = tuned.state_dict()
    if not set(base_state) <= set(tuned_state):
        only = sorted(set(base_state) - set(tuned_state))[:5]
        raise ValueError(
            f"cannot merge {finetuned_dir} with {base_model}: the base has tensors the fine-tuned model "
            f"lacks, e.g. {only}"
        )
    with torch.no_grad():
        for name, tensor in tuned_state.items():
            if name not in base_state:  # a layer fine-tuning appended (the Matryoshka rotation): kept as is
                continue
            other = base_state[name]
            if tensor.shape != other.shape:
                raise ValueError(
                    f"cannot merge {finetuned_dir} with {base_model}: {name} is {tuple(tensor.shape)} vs "
                    f"{tuple(other.shape)}"
                )
            if tensor.is_floating_point():
                tensor.mul_(weight).add_(other.to(tensor.dtype), alpha=1.0 - weight)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    # Our card (no corpus text) is copied; sentence-transformers' generated one is not written.
    tuned.save(str(out), create_model_card=False)
    from embed_assets.model_card import CARD_FILE, FACTS_FILE, update_card

    for name in (CARD_FILE, FACTS_FILE):
        if (Path(finetuned_dir) / name).is_file():
            shutil.copyfile(Path(finetuned_dir) / name, out / name)
    update_card(out, merge={"finetuned_weight": weight, "base_weight": round(1.0 - weight, 6)})
    return out
