"""Model checkpoints in storage: ``<dir>/model.pt`` (a plain state_dict, loadable with
``torch.load(weights_only=True)``) and ``<dir>/model_config.json`` (GPTConfig + training position)."""

from __future__ import annotations

import io

import torch

from stages.train.model import GPT, GPTConfig

MODEL_FILE, CONFIG_FILE = "model.pt", "model_config.json"


def step_dir(step: int) -> str:
    return f"checkpoints/step_{step:06d}"


def save_model(storage, rel_dir: str, model: torch.nn.Module, cfg: GPTConfig, info: dict | None = None) -> list[str]:
    """Write the bare model's weights (fp32, CPU) and config; returns the two relative paths."""
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(f"{rel_dir}/{MODEL_FILE}", buf.getvalue())
    storage.write_json(f"{rel_dir}/{CONFIG_FILE}", {"model": cfg.to_dict(), **(info or {})})
    return [f"{rel_dir}/{MODEL_FILE}", f"{rel_dir}/{CONFIG_FILE}"]


def load_model(storage, rel_dir: str = "final") -> tuple[GPT, dict]:
    """Rebuild the model from a checkpoint folder (weights_only load: no code runs from the file)."""
    meta = storage.read_json(f"{rel_dir}/{CONFIG_FILE}")
    model = GPT(GPTConfig.from_dict(meta["model"]))
    state = torch.load(io.BytesIO(storage.read_bytes(f"{rel_dir}/{MODEL_FILE}")), weights_only=True,
                       map_location="cpu")
    model.load_state_dict(state)
    return model.eval(), meta
