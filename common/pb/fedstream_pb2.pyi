from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_KIND_UNSPECIFIED: _ClassVar[PlanKind]
    PLAN_TRAIN: _ClassVar[PlanKind]
    PLAN_EVALUATE: _ClassVar[PlanKind]

class FinishKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_KIND_UNSPECIFIED: _ClassVar[FinishKind]
    FINISH_RUN_COMPLETE: _ClassVar[FinishKind]
    FINISH_SERVER_STOPPING: _ClassVar[FinishKind]
    FINISH_REPLACED: _ClassVar[FinishKind]
PLAN_KIND_UNSPECIFIED: PlanKind
PLAN_TRAIN: PlanKind
PLAN_EVALUATE: PlanKind
FINISH_KIND_UNSPECIFIED: FinishKind
FINISH_RUN_COMPLETE: FinishKind
FINISH_SERVER_STOPPING: FinishKind
FINISH_REPLACED: FinishKind

class Scalar(_message.Message):
    __slots__ = ("number", "integer", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("model", "dataset", "seed", "test_fraction", "num_partitions", "partition", "dirichlet_alpha", "task", "task_options", "task_fingerprint")
    class TaskOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    seed: int
    test_fraction: float
    num_partitions: int
    partition: str
    dirichlet_alpha: float
    task: str
    task_options: _containers.ScalarMap[str, str]
    task_fingerprint: str
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., seed: _Optional[int] = ..., test_fraction: _Optional[float] = ..., num_partitions: _Optional[int] = ..., partition: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ..., task: _Optional[str] = ..., task_options: _Optional[_Mapping[str, str]] = ..., task_fingerprint: _Optional[str] = ...) -> None: ...

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

class RoundStart(_message.Message):
    __slots__ = ("round", "manifest", "plan_id", "kind", "config", "deadline_unix_s")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    manifest: Manifest
    plan_id: str
    kind: PlanKind
    config: _containers.MessageMap[str, Scalar]
    deadline_unix_s: float
    def __init__(self, round: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., plan_id: _Optional[str] = ..., kind: _Optional[_Union[PlanKind, str]] = ..., config: _Optional[_Mapping[str, Scalar]] = ..., deadline_unix_s: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("steps", "train_started_unix_s", "train_finished_unix_s", "device")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    train_started_unix_s: float
    train_finished_unix_s: float
    device: str
    def __init__(self, steps: _Optional[int] = ..., train_started_unix_s: _Optional[float] = ..., train_finished_unix_s: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "manifest", "report", "plan_id", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_examples: int
    manifest: Manifest
    report: TrainReport
    plan_id: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., report: _Optional[_Union[TrainReport, _Mapping]] = ..., plan_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

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

class EvaluationResult(_message.Message):
    __slots__ = ("client_id", "round", "plan_id", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    plan_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., plan_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("client_id", "plan_id", "reason", "leaving")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    plan_id: str
    reason: str
    leaving: bool
    def __init__(self, client_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., reason: _Optional[str] = ..., leaving: _Optional[bool] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("counted",)
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    counted: bool
    def __init__(self, counted: _Optional[bool] = ...) -> None: ...
