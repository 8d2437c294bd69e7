from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_KIND_UNSPECIFIED: _ClassVar[FinishKind]
    FINISH_RUN_COMPLETE: _ClassVar[FinishKind]
    FINISH_SERVER_STOPPING: _ClassVar[FinishKind]
    FINISH_REPLACED: _ClassVar[FinishKind]
FINISH_KIND_UNSPECIFIED: FinishKind
FINISH_RUN_COMPLETE: FinishKind
FINISH_SERVER_STOPPING: FinishKind
FINISH_REPLACED: FinishKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "total_bytes")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("model", "dataset", "seed", "test_fraction", "num_partitions", "partition", "dirichlet_alpha")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    seed: int
    test_fraction: float
    num_partitions: int
    partition: str
    dirichlet_alpha: float
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., seed: _Optional[int] = ..., test_fraction: _Optional[float] = ..., num_partitions: _Optional[int] = ..., partition: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "protocol_version", "partition_index")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    protocol_version: int
    partition_index: int
    def __init__(self, client_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., partition_index: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "run", "partition_index", "max_message_bytes", "credential")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run: RunSpec
    partition_index: int
    max_message_bytes: int
    credential: str
    def __init__(self, client_id: _Optional[str] = ..., run: _Optional[_Union[RunSpec, _Mapping]] = ..., partition_index: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., credential: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "optimizer", "momentum", "weight_decay", "deadline_unix_s")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    deadline_unix_s: float
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[str] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., deadline_unix_s: _Optional[float] = ...) -> None: ...

class RoundStart(_message.Message):
    __slots__ = ("round", "config", "manifest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    config: RoundConfig
    manifest: Manifest
    def __init__(self, round: _Optional[int] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TransferEnd(_message.Message):
    __slots__ = ("total_bytes", "crc32")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    crc32: int
    def __init__(self, total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "kind")
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    reason: str
    kind: FinishKind
    def __init__(self, reason: _Optional[str] = ..., kind: _Optional[_Union[FinishKind, str]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("round_start", "chunk", "end", "finish")
    ROUND_START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    round_start: RoundStart
    chunk: Chunk
    end: TransferEnd
    finish: Finish
    def __init__(self, round_start: _Optional[_Union[RoundStart, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[TransferEnd, _Mapping]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ...) -> None: ...

class TrainReport(_message.Message):
    __slots__ = ("train_loss", "steps", "train_started_unix_s", "train_finished_unix_s", "device")
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    steps: int
    train_started_unix_s: float
    train_finished_unix_s: float
    device: str
    def __init__(self, train_loss: _Optional[float] = ..., steps: _Optional[int] = ..., train_started_unix_s: _Optional[float] = ..., train_finished_unix_s: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "manifest", "report")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_examples: int
    manifest: Manifest
    report: TrainReport
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., report: _Optional[_Union[TrainReport, _Mapping]] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    end: TransferEnd
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[TransferEnd, _Mapping]] = ...) -> None: ...

class UpdateReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
