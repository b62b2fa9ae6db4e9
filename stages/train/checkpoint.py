"""Model checkpoints in storage: ``<dir>/model.pt`` (a plain state_dict, loadable with
``torch.load(weights_only=True)``) and ``<dir>/model_config.json`` (GPTConfig + training position).

Under FSDP2 the same files: the worker gathers the shards first (``parallel.full_state_dict``), so model.pt and
model.safetensors have the keys, dtypes and tied-head layout of a DDP run (tests/test_train.py compares them).
The training state (``save_state``/``load_state``) is DCP either way: ``get_state_dict`` gives DTensor shards
under FSDP2 (each rank's ``__<rank>_0.distcp`` then holds its own shards of weights and AdamW moments) and
full tensors under DDP.

Resuming never unpickles arbitrary objects. DCP's ``FileSystemReader.read_metadata`` reads ``.metadata`` with plain
``pickle.load``, and its ``DefaultLoadPlanner.load_bytes`` reads every non-tensor item (AdamW's param_groups: lr,
betas, ...) by torch.load with ``weights_only=False`` (torch 2.13 filesystem.py, default_planner.py): a crafted state
folder in the run's storage would run code. ``load_state`` therefore reads through ``SafeReader`` (a
``FileSystemReader`` whose metadata unpickler resolves only ``METADATA_GLOBALS``) and ``SafePlanner`` (non-tensor
items with ``weights_only=True``; DCP already loads tensors so). The state is always staged to a local folder
first (S3 too: ``Storage.get_file``), so the filesystem reader is the only DCP reader in use."""

from __future__ import annotations

import io
import json
import pickle

import torch

from stages.train.model import GPT, GPTConfig

MODEL_FILE, CONFIG_FILE, SAFETENSORS_FILE = "model.pt", "model_config.json", "model.safetensors"


def step_dir(step: int) -> str:
    return f"checkpoints/step_{step:06d}"


def save_model(storage, rel_dir: str, model: torch.nn.Module | dict, cfg: GPTConfig, info: dict | None = None,
               safetensors: bool = False) -> list[str]:
    """Write the bare model's weights (fp32, CPU) and config; with ``safetensors`` also ``model.safetensors``
    (the same tensors, loadable without Kiln or torch.load: ``safetensors.torch.load_file``; a tied head is
    stored once, under ``embed.weight``). ``model``: a bare model, or its full state dict (what
    ``parallel.full_state_dict`` gathers from FSDP shards: the same keys and format as DDP's). Returns the
    relative paths written."""
    src = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in src.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(f"{rel_dir}/{MODEL_FILE}", buf.getvalue())
    storage.write_json(f"{rel_dir}/{CONFIG_FILE}", {"model": cfg.to_dict(), **(info or {})})
    paths = [f"{rel_dir}/{MODEL_FILE}", f"{rel_dir}/{CONFIG_FILE}"]
    if safetensors:
        from safetensors.torch import save

        tensors = {k: v for k, v in state.items() if not (cfg.tie_embeddings and k == "head.weight")}
        storage.write_bytes(f"{rel_dir}/{SAFETENSORS_FILE}", save(tensors, metadata={"format": "pt",
                                                                                  "config": json.dumps(cfg.to_dict())}))
        paths.append(f"{rel_dir}/{SAFETENSORS_FILE}")
    return paths


def load_model(storage, rel_dir: str = "final") -> tuple[GPT, dict]:
    """Rebuild the model from a checkpoint folder (weights_only load: no code runs from the file)."""
    meta = storage.read_json(f"{rel_dir}/{CONFIG_FILE}")
    model = GPT(GPTConfig.from_dict(meta["model"]))
    state = torch.load(io.BytesIO(storage.read_bytes(f"{rel_dir}/{MODEL_FILE}")), weights_only=True,
                       map_location="cpu")
    model.load_state_dict(state)
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------------------------
# training state (model + optimizer) for exact resume: torch.distributed.checkpoint, staged locally, then stored

STATE_DIR, MARKER = "state", "COMPLETE.json"


def save_state(out, step: int, model: torch.nn.Module, opt, d, staging: str, meta: dict, keep: int = 0) -> None:
    """Collective (every rank): a DCP checkpoint of model + optimizer at ``checkpoints/step_N/state/``. Each rank
    writes its files to local ``staging`` and uploads its own ``__<rank>_*.distcp``; after a barrier rank 0
    uploads ``.metadata`` and then ``COMPLETE.json`` (``meta``: step, fingerprints, metrics so far): a checkpoint
    without the marker is incomplete and never resumed from. ``keep`` > 0: only the newest ``keep`` training
    states stay (model.pt snapshots are kept for evaluation)."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from stages.train import parallel

    msd, osd = get_state_dict(model, opt)
    local = os.path.join(staging, f"save_{step:06d}")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=local)
    rel = f"{step_dir(step)}/{STATE_DIR}"
    for f in sorted(os.listdir(local)):
        if f.startswith(f"__{d.rank}_"):
            out.put_file(os.path.join(local, f), f"{rel}/{f}")
    parallel.barrier(d)
    if d.is_main:
        out.put_file(os.path.join(local, ".metadata"), f"{rel}/.metadata")
        out.write_json(f"{step_dir(step)}/{MARKER}", {**meta, "step": step, "world_size": d.world})
        if keep > 0:
            for old, _ in complete_states(out)[keep:]:
                out.rm(f"{step_dir(old)}/{STATE_DIR}")
                out.rm(f"{step_dir(old)}/{MARKER}")
    parallel.barrier(d)


def complete_states(out) -> list[tuple[int, dict]]:
    """(step, marker) of every complete training state in ``out``, newest first."""
    found = []
    for rel in out.list("checkpoints", suffix=MARKER):
        found.append((int(rel.split("/")[1].removeprefix("step_")), out.read_json(rel)))
    return sorted(found, key=lambda x: -x[0])


# What a real .metadata refers to by name, recorded by unpickling the training states of 1- and 2-rank DDP and
# FSDP2 runs of the train stage (torch 2.13, fp32; tests/test_train.py::test_real_states_load_through_the_
# restricted_reader checks every state those tests write): DCP's metadata dataclasses and storage index,
# torch.Size, dtype and layout (by name: _get_layout looks a torch.layout up in a dict), and the checkpoint id (a
# PosixPath). Every dtype is allowed (a constant, not a callable; a bf16 state names torch.bfloat16). No builtins:
# containers and numbers are pickle opcodes.
_DCP_METADATA = ("Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                 "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in _DCP_METADATA),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    *(("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype))})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"training state {self.path} refers to {module}.{name}, not a "
                                         f"torch.distributed.checkpoint metadata type: refused to unpickle it")
        return super().find_class(module, name)


def _safe_reader_cls():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """``FileSystemReader`` whose ``read_metadata`` (same file and fix-ups as torch 2.13's) resolves only
        ``METADATA_GLOBALS``; anything else is a ``pickle.UnpicklingError`` naming the file."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f, str(path)).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"training state {path} holds a {type(metadata).__name__}, not DCP "
                                             f"Metadata: refused")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_planner_cls():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        """``DefaultLoadPlanner`` whose non-tensor items load with ``weights_only=True`` (torch's: False)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner


def load_state(out, step: int, model: torch.nn.Module, opt, d, staging: str) -> None:
    """Every rank: fetch ``checkpoints/step_N/state/`` to its own staging folder and load model + optimizer
    (DCP reshards if the world size changed; same world size on CPU resumes bit for bit). Read through
    ``SafeReader`` and ``SafePlanner``: a state whose metadata or items are not plain data is refused (a
    ``pickle.UnpicklingError`` naming the file) before anything in it runs."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rel = f"{step_dir(step)}/{STATE_DIR}"
    local = os.path.join(staging, f"load_{step:06d}_rank{d.rank}")
    for f in out.list(rel):
        out.get_file(f, os.path.join(local, f.rsplit("/", 1)[1]))
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    reader = _safe_reader_cls()(local)
    reader.read_metadata()  # refused here with its own message, not wrapped in DCP's CheckpointException
    dcp.load(state, storage_reader=reader, planner=_safe_planner_cls()())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
