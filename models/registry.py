"""The one place that names every model and answers every per-model question:
its architecture and config, labels, its service endpoint and task, its training
script, the example input used by export, verification, benchmarks and tests,
the ONNX signature and dynamic axes, the candidate ONNX variants, the data it
is verified on, and its BentoML model name. Training, export, verification,
registration, the service, the benchmarks and the tests all read this; no model
name, tag or per-model table is typed elsewhere.

Reading specs imports neither torch nor a data set loader: the architecture,
the training script and the verification data are named as ``module:attribute``
strings, imported on first use, and the example inputs are NumPy arrays.

The released artifacts live in ``models/artifacts/<name>/``; set
``MODEL_ARTIFACTS_DIR`` to read and write them somewhere else. Models defined
outside this package join the registry through ``MODEL_SPECS`` (see ``Registry``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.artifacts import Artifact, load_artifact
from models.preprocessing import encode_text_arrays, latent_arrays
from models.tokenizer import UNK_ID

if TYPE_CHECKING:
    import torch
    from torch import nn

DIGIT_LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")

PACKAGE_ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"

MNIST_CLASSIFIER = "mnist-cnn"
SENTIMENT_CLASSIFIER = "sst2-bilstm"
DIGIT_GENERATOR = "digit-gan"


def artifacts_root() -> Path:
    return Path(os.environ.get("MODEL_ARTIFACTS_DIR", PACKAGE_ARTIFACTS_DIR))


@dataclass(frozen=True)
class OnnxSignature:
    """Input/output names of the exported graph and which axes stay dynamic."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]


@dataclass(frozen=True)
class Verification:
    """What a model is verified on, and how a prediction is read from its outputs.

    ``data`` names (``module:function``) the training-side builder of the
    evaluation set: ``(spec, artifact directory, data dir, limit)`` → the test
    split as ONNX feeds with a target label per example. ``labels_read_by`` is
    None where the predicted label is the argmax of the outputs, else the name
    of the classifier model that reads it from the generated image.
    """

    data: str
    split: str
    labels_read_by: str | None = None


# The sizes the export traces with: not 0 or 1 (torch.export specialises those)
# and different from each other, so batch and sequence cannot be unified into
# one symbol.
EXAMPLE_BATCH = 3
EXAMPLE_LENGTH = 5

# (config, batch size, seed, sequence length) → the inputs in ONNX input order.
ExampleInputs = Callable[[Mapping[str, Any], int, int, int], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class Batching:
    """How the service's batcher forms this model's batches on one kind of device."""

    max_batch_size: int
    max_latency_ms: float


@dataclass(frozen=True)
class Serving:
    """How the service runs a model unless its settings say otherwise, per device type
    (``cpu`` or ``cuda``). Every default below was chosen by measurement.

    Backend, measured with ``python -m bench.measure_backends`` (1 thread, median ms
    per call at batch 1 / 64): mnist-cnn torch 0.64 / 27.9, onnx 0.10 / 5.1;
    sst2-bilstm torch 0.72 / 12.7, onnx 0.31 / 11.9; digit-gan torch 1.39 / 32.2,
    onnx 0.49 / 29.4; so ONNX Runtime on the CPU. The kept int8 graphs are faster
    still (sst2-bilstm 0.16 / 6.1 ms) but not bit-faithful, so they are opt-in. On
    CUDA the default is PyTorch in half precision; it is not measured here (no GPU):
    run the same command on the GPU and override where ONNX wins.

    Batching, measured on the 2-core CPU machine (ONNX Runtime, 1 worker,
    ``python -m bench.run --url ... --concurrency 64|256``, requests/s for classify /
    sentiment / generate n=1): at 64 clients batch 8: 1051 / 999 / 841, 16: 952 /
    1112 / 1010, 32: 1112 / 1285 / 1122, 64: 1156 / 1280 / 910; at 256 clients batch
    32: 930 / 1072 / 909, 64: 1048 / 1227 / 894, 128: 938 / 1003 / 875; a wait of
    0 ms: 1100 / 1326 / 819, 2 ms: 1156 / 1280 / 910, 5 ms: 929 / 1152 / 1015;
    batching off: 566 / 487 / 393. 64 items and 2 ms are best or within noise
    everywhere. The CUDA defaults are not measured (no GPU): larger batches cost a
    GPU almost nothing.
    """

    backend: Mapping[str, str] = field(default_factory=lambda: {"cpu": "onnx", "cuda": "torch"})
    batching: Mapping[str, Batching] = field(
        default_factory=lambda: {"cpu": Batching(64, 2.0), "cuda": Batching(256, 2.0)}
    )
    # Whether the model's intra-op pool leaves one of the worker's cores to its event
    # loop: for a model whose batches are many small sequential steps, where a second
    # thread only adds hand-offs.
    spare_core: bool = False

    def device_type(self, device_type: str) -> str:
        return "cuda" if device_type == "cuda" else "cpu"


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelSpec:
    """Every fact about one model.

    ``config`` and ``module`` name the architecture as ``module:Class``, ``training``
    the training script's module and ``verification.data`` its test-split builder,
    all imported on first use: reading specs (names, tags, files, example inputs)
    does not import torch, so the serving parent process and the tools that only
    read metadata stay small."""

    name: str
    description: str
    config: str
    module: str
    onnx: OnnxSignature
    # The service's name for this model: its routes (``/<endpoint>``, and the others its
    # task adds, such as ``/<endpoint>_batch``), its settings (``SERVING_<ENDPOINT>_*``)
    # and its metrics' ``endpoint`` label.
    endpoint: str
    # What the service does with it: the name of one of the kinds of request and
    # answer the service knows (``service.tasks``).
    task: str
    # The training script (``python -m <training>``); it writes a complete artifact.
    training: str
    example: ExampleInputs
    verification: Verification
    # ONNX variants exported next to fp32 as candidates (``training.variants`` keeps
    # or drops each by its recorded criteria).
    variants: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    serving: Serving = field(default_factory=Serving)

    def example_inputs(
        self,
        config: Any,
        batch_size: int = EXAMPLE_BATCH,
        seed: int = 0,
        sequence_length: int = EXAMPLE_LENGTH,
    ) -> tuple[np.ndarray, ...]:
        """A reproducible input batch in ``onnx.inputs`` order, as NumPy arrays.

        ``config`` is the config dataclass or its dict (an artifact's config.json);
        ``sequence_length`` is the longest row where the model reads sequences.
        """
        values = asdict(config) if is_dataclass(config) else dict(config)
        return self.example(values, batch_size, seed, sequence_length)

    def example_feed(
        self,
        config: Any,
        batch_size: int = EXAMPLE_BATCH,
        seed: int = 0,
        sequence_length: int = EXAMPLE_LENGTH,
    ) -> dict[str, np.ndarray]:
        """``example_inputs`` keyed by ONNX input name (an ONNX Runtime feed)."""
        arrays = self.example_inputs(config, batch_size, seed, sequence_length)
        return dict(zip(self.onnx.inputs, arrays, strict=True))

    @property
    def training_module(self) -> Any:
        return importlib.import_module(self.training)

    @property
    def evaluation_data(self) -> Callable[..., Any]:
        return _import(self.verification.data)

    @property
    def config_type(self) -> type:
        return _import(self.config)

    @property
    def module_type(self) -> type[nn.Module]:
        return _import(self.module)

    @property
    def bento_model_name(self) -> str:
        """The BentoML model store name; the version is derived from the artifact's content."""
        return self.name

    def bento_tag(self, metadata: Mapping[str, Any]) -> str:
        """The store tag of an artifact, from its metadata.json: ``name:content-version``."""
        return f"{self.bento_model_name}:{store_version(metadata)}"

    def artifact_dir(self, root: Path | None = None) -> Path:
        return (root or artifacts_root()) / self.name

    def config_from_dict(self, values: Mapping[str, Any]) -> Any:
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return self.config_type(**converted)

    def build(self, config: Any) -> nn.Module:
        if isinstance(config, Mapping):
            config = self.config_from_dict(config)
        return self.module_type(config)

    def load_artifact(self, directory: Path | None = None, *, verify: bool = True) -> Artifact:
        return load_artifact(directory or self.artifact_dir(), verify=verify)

    def load_module(self, artifact: Artifact, device: str | torch.device = "cpu") -> nn.Module:
        """Rebuild the module from the artifact's config and weights, in eval mode."""
        module = self.build(artifact.config)
        module.load_state_dict(artifact.state_dict(map_location="cpu"))
        return module.to(device).eval()


def digit_image_examples(
    config: Mapping[str, Any], batch_size: int, seed: int, sequence_length: int
) -> tuple[np.ndarray, ...]:
    side = config["image_size"]
    shape = (batch_size, config["in_channels"], side, side)
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32),)


def _token_ids(
    config: Mapping[str, Any], batch_size: int, seed: int, sequence_length: int
) -> tuple[np.ndarray, ...]:
    """Random known-word ids; row 0 is ``sequence_length`` long, later rows shorter
    (5, 2, 1 for the traced 3 × 5), so the batch has real padding."""
    rng = np.random.default_rng(seed)
    lengths = [max(1, sequence_length - 3 * row) for row in range(batch_size)]
    ids = [rng.integers(UNK_ID + 1, config["vocab_size"], length).tolist() for length in lengths]
    return encode_text_arrays(ids)


def _latent_and_labels(
    config: Mapping[str, Any], batch_size: int, seed: int, sequence_length: int
) -> tuple[np.ndarray, ...]:
    return latent_arrays(batch_size, config["latent_dim"], seed, num_classes=config["num_classes"])


RELEASED: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=MNIST_CLASSIFIER,
        description="MNIST digit classifier (two-convolution CNN)",
        config="models.digits:DigitClassifierConfig",
        module="models.digits:DigitClassifier",
        labels=DIGIT_LABELS,
        endpoint="classify",
        task="digit-classification",
        training="training.mnist",
        example=digit_image_examples,
        verification=Verification(
            data="training.evaluation:mnist_test_split", split="MNIST test split"
        ),
        variants=("int8", "fp16"),
        onnx=OnnxSignature(
            inputs=("images",),
            outputs=("logits",),
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        ),
    ),
    ModelSpec(
        name=SENTIMENT_CLASSIFIER,
        description="SST-2 sentiment classifier (BiLSTM, max-pooled)",
        config="models.sentiment:SentimentClassifierConfig",
        module="models.sentiment:SentimentClassifier",
        labels=SENTIMENT_LABELS,
        endpoint="sentiment",
        task="text-classification",
        training="training.sentiment",
        example=_token_ids,
        verification=Verification(
            data="training.evaluation:sst2_test_split", split="SST-2 test split"
        ),
        # No fp16 candidate: the 30 MB release budget buys a larger embedding
        # instead (85.8 against 84.3 % dev accuracy, same seed and teachers), and
        # on a GPU the service runs the model in PyTorch fp16 (cuDNN's LSTM) anyway.
        variants=("int8",),
        # A second intra-op thread gave 0.93× the requests/s: the core goes to HTTP.
        serving=Serving(spare_core=True),
        onnx=OnnxSignature(
            inputs=("token_ids", "lengths"),
            outputs=("logits",),
            dynamic_axes={
                "token_ids": {0: "batch", 1: "sequence"},
                "lengths": {0: "batch"},
                "logits": {0: "batch"},
            },
        ),
    ),
    ModelSpec(
        name=DIGIT_GENERATOR,
        description="Conditional DCGAN generator of 28×28 digits",
        config="models.gan:GeneratorConfig",
        module="models.gan:Generator",
        labels=DIGIT_LABELS,
        endpoint="generate",
        task="digit-generation",
        training="training.gan",
        example=_latent_and_labels,
        verification=Verification(
            data="training.evaluation:generator_inputs",
            split="generator inputs, every digit equally often",
            labels_read_by=MNIST_CLASSIFIER,
        ),
        # No INT8 candidate: the bulk of the generator is transposed convolutions,
        # which dynamic quantization does not cover.
        variants=("fp16",),
        # The generator's cost is all model (about 0.5 ms a row): bigger batches
        # amortise its per-call overhead, 1.22× requests/s for n=16 at 64 clients
        # with 256 items against 64.
        serving=Serving(batching={"cpu": Batching(256, 2.0), "cuda": Batching(256, 2.0)}),
        onnx=OnnxSignature(
            inputs=("latent", "labels"),
            outputs=("images",),
            dynamic_axes={
                "latent": {0: "batch"},
                "labels": {0: "batch"},
                "images": {0: "batch"},
            },
        ),
    ),
)

# Models defined outside this package: a comma-separated list of modules, each with a
# ``SPECS`` sequence of ``ModelSpec`` (``module:attribute`` names another attribute).
EXTRA_SPECS_VARIABLE = "MODEL_SPECS"


class Registry(Mapping[str, ModelSpec]):
    """Every model by name: the released ones, then those ``MODEL_SPECS`` names.

    The extra modules are imported on first use, not when this module is imported,
    so that the environment of the process that uses the registry is the one read.
    """

    def __init__(self, released: tuple[ModelSpec, ...]) -> None:
        self._released = released
        self._specs: dict[str, ModelSpec] | None = None

    def _all(self) -> dict[str, ModelSpec]:
        if self._specs is None:
            specs: dict[str, ModelSpec] = {}
            for spec in (*self._released, *extra_specs(os.environ.get(EXTRA_SPECS_VARIABLE, ""))):
                for other in specs.values():
                    if spec.name == other.name or spec.endpoint == other.endpoint:
                        raise ValueError(
                            f"model {spec.name!r} (endpoint {spec.endpoint!r}) clashes with "
                            f"{other.name!r} (endpoint {other.endpoint!r})"
                        )
                specs[spec.name] = spec
            self._specs = specs
        return self._specs

    def __getitem__(self, name: str) -> ModelSpec:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def reload(self) -> None:
        """Read ``MODEL_SPECS`` again on next use (for tests that change it)."""
        self._specs = None


def extra_specs(names: str) -> list[ModelSpec]:
    """The specs of the modules named in ``names`` (see ``EXTRA_SPECS_VARIABLE``)."""
    specs: list[ModelSpec] = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        module, _, attribute = name.partition(":")
        found = getattr(importlib.import_module(module), attribute or "SPECS")
        for spec in found:
            if not isinstance(spec, ModelSpec):
                raise TypeError(f"{EXTRA_SPECS_VARIABLE}: {name} holds {spec!r}, not a ModelSpec")
            specs.append(spec)
    return specs


REGISTRY = Registry(RELEASED)


def store_version(metadata: Mapping[str, Any]) -> str:
    """A short, stable model store version: a hash of the artifact's file checksums.

    Registering the same content twice gives the same version, and the service
    can pin the exact version it expects from the artifact's metadata.json alone.
    """
    manifest = json.dumps(metadata["files"], sort_keys=True).encode()
    return hashlib.sha256(manifest).hexdigest()[:16]


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None
