from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_PHASE_UNSPECIFIED: _ClassVar[SecAggPhase]
    ADVERTISE: _ClassVar[SecAggPhase]
    SHARE: _ClassVar[SecAggPhase]
    MASK: _ClassVar[SecAggPhase]
    UNMASK: _ClassVar[SecAggPhase]
SECAGG_PHASE_UNSPECIFIED: SecAggPhase
ADVERTISE: SecAggPhase
SHARE: SecAggPhase
MASK: SecAggPhase
UNMASK: SecAggPhase

class JoinRequest(_message.Message):
    __slots__ = ("token", "client_name", "agent_version", "device", "sign_public_key", "kx_public_key", "features")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIGN_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    KX_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token: str
    client_name: str
    agent_version: str
    device: str
    sign_public_key: bytes
    kx_public_key: bytes
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token: _Optional[str] = ..., client_name: _Optional[str] = ..., agent_version: _Optional[str] = ..., device: _Optional[str] = ..., sign_public_key: _Optional[bytes] = ..., kx_public_key: _Optional[bytes] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "job_id", "heartbeat_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    job_id: str
    heartbeat_seconds: int
    def __init__(self, client_id: _Optional[str] = ..., job_id: _Optional[str] = ..., heartbeat_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "wait_seconds", "training_task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    wait_seconds: float
    training_task_id: str
    def __init__(self, client_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., training_task_id: _Optional[str] = ...) -> None: ...

class FileRef(_message.Message):
    __slots__ = ("path", "sha256", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("job_id", "round", "task_id", "base_model_hash", "base_files", "global_adapter", "peft_config_json", "training_json", "deadline_unix", "max_update_bytes", "job_public_key", "secagg", "privacy_json", "strategy_state", "evaluation_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    BASE_FILES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PEFT_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    JOB_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_JSON_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_STATE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    task_id: str
    base_model_hash: str
    base_files: _containers.RepeatedCompositeFieldContainer[FileRef]
    global_adapter: FileRef
    peft_config_json: str
    training_json: str
    deadline_unix: float
    max_update_bytes: int
    job_public_key: bytes
    secagg: SecAggTask
    privacy_json: str
    strategy_state: FileRef
    evaluation_json: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., base_files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ..., global_adapter: _Optional[_Union[FileRef, _Mapping]] = ..., peft_config_json: _Optional[str] = ..., training_json: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., max_update_bytes: _Optional[int] = ..., job_public_key: _Optional[bytes] = ..., secagg: _Optional[_Union[SecAggTask, _Mapping]] = ..., privacy_json: _Optional[str] = ..., strategy_state: _Optional[_Union[FileRef, _Mapping]] = ..., evaluation_json: _Optional[str] = ...) -> None: ...

class SecAggTask(_message.Message):
    __slots__ = ("params", "index", "attempt", "weight_cap")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    params: bytes
    index: int
    attempt: int
    weight_cap: int
    def __init__(self, params: _Optional[bytes] = ..., index: _Optional[int] = ..., attempt: _Optional[int] = ..., weight_cap: _Optional[int] = ...) -> None: ...

class SignedAdvert(_message.Message):
    __slots__ = ("advert", "signature", "sign_public_key")
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGN_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    advert: bytes
    signature: bytes
    sign_public_key: bytes
    def __init__(self, advert: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., sign_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggStep(_message.Message):
    __slots__ = ("job_id", "round", "attempt", "phase", "adverts", "shares", "unmask_request", "task_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    attempt: int
    phase: SecAggPhase
    adverts: _containers.RepeatedCompositeFieldContainer[SignedAdvert]
    shares: _containers.RepeatedScalarFieldContainer[bytes]
    unmask_request: bytes
    task_id: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., adverts: _Optional[_Iterable[_Union[SignedAdvert, _Mapping]]] = ..., shares: _Optional[_Iterable[bytes]] = ..., unmask_request: _Optional[bytes] = ..., task_id: _Optional[str] = ...) -> None: ...

class SecAggMessage(_message.Message):
    __slots__ = ("job_id", "round", "attempt", "phase", "payload", "signature", "shares")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    attempt: int
    phase: SecAggPhase
    payload: bytes
    signature: bytes
    shares: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., shares: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id", "reason", "task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    reason: str
    task_id: str
    def __init__(self, client_id: _Optional[str] = ..., reason: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("released", "message")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    released: bool
    message: str
    def __init__(self, released: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("action", "task", "retry_after_seconds", "message", "secagg")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[HeartbeatReply.Action]
        WAIT: _ClassVar[HeartbeatReply.Action]
        TRAIN: _ClassVar[HeartbeatReply.Action]
        STOP: _ClassVar[HeartbeatReply.Action]
        SECAGG: _ClassVar[HeartbeatReply.Action]
        EVALUATE: _ClassVar[HeartbeatReply.Action]
    ACTION_UNSPECIFIED: HeartbeatReply.Action
    WAIT: HeartbeatReply.Action
    TRAIN: HeartbeatReply.Action
    STOP: HeartbeatReply.Action
    SECAGG: HeartbeatReply.Action
    EVALUATE: HeartbeatReply.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatReply.Action
    task: Task
    retry_after_seconds: float
    message: str
    secagg: SecAggStep
    def __init__(self, action: _Optional[_Union[HeartbeatReply.Action, str]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., retry_after_seconds: _Optional[float] = ..., message: _Optional[str] = ..., secagg: _Optional[_Union[SecAggStep, _Mapping]] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("job_id", "round", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvalAck(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("job_id", "round", "task_id", "update_id", "num_examples", "total_size", "sha256", "metrics", "codec", "envelope")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    task_id: str
    update_id: str
    num_examples: int
    total_size: int
    sha256: str
    metrics: _containers.ScalarMap[str, float]
    codec: str
    envelope: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., update_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., codec: _Optional[str] = ..., envelope: _Optional[str] = ...) -> None: ...

class UploadCommit(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    commit: UploadCommit
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., commit: _Optional[_Union[UploadCommit, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("update_id", "duplicate", "bytes_received")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    duplicate: bool
    bytes_received: int
    def __init__(self, update_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class AdminIdentity(_message.Message):
    __slots__ = ("name", "role", "kind", "created_unix", "created_by", "key_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    kind: str
    created_unix: float
    created_by: str
    key_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., kind: _Optional[str] = ..., created_unix: _Optional[float] = ..., created_by: _Optional[str] = ..., key_fingerprint: _Optional[str] = ...) -> None: ...

class AddAdminRequest(_message.Message):
    __slots__ = ("name", "role", "public_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    public_key: bytes
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class AddAdminReply(_message.Message):
    __slots__ = ("identity", "token")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    identity: AdminIdentity
    token: str
    def __init__(self, identity: _Optional[_Union[AdminIdentity, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class ListAdminsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdminsReply(_message.Message):
    __slots__ = ("identities",)
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[AdminIdentity]
    def __init__(self, identities: _Optional[_Iterable[_Union[AdminIdentity, _Mapping]]] = ...) -> None: ...

class RemoveAdminRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReadAuditRequest(_message.Message):
    __slots__ = ("limit", "who")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    limit: int
    who: str
    def __init__(self, limit: _Optional[int] = ..., who: _Optional[str] = ...) -> None: ...

class ReadAuditReply(_message.Message):
    __slots__ = ("lines", "truncated")
    LINES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, lines: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec_yaml",)
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    def __init__(self, spec_yaml: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "state", "cohort", "contributors", "metrics_json", "bytes_up", "bytes_down", "seconds", "client_evals", "client_updates", "cohort_client_ids")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_EVALS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_UPDATES_FIELD_NUMBER: _ClassVar[int]
    COHORT_CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    cohort: int
    contributors: int
    metrics_json: str
    bytes_up: int
    bytes_down: int
    seconds: float
    client_evals: _containers.RepeatedCompositeFieldContainer[ClientEval]
    client_updates: _containers.RepeatedCompositeFieldContainer[ClientUpdate]
    cohort_client_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., cohort: _Optional[int] = ..., contributors: _Optional[int] = ..., metrics_json: _Optional[str] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., seconds: _Optional[float] = ..., client_evals: _Optional[_Iterable[_Union[ClientEval, _Mapping]]] = ..., client_updates: _Optional[_Iterable[_Union[ClientUpdate, _Mapping]]] = ..., cohort_client_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ClientUpdate(_message.Message):
    __slots__ = ("client_id", "num_examples", "metrics_json", "bytes")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    num_examples: int
    metrics_json: str
    bytes: int
    def __init__(self, client_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics_json: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ClientEval(_message.Message):
    __slots__ = ("client_id", "num_examples", "metrics_json")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    num_examples: int
    metrics_json: str
    def __init__(self, client_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class ClientSummary(_message.Message):
    __slots__ = ("client_id", "name", "connected", "last_seen_unix")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    connected: bool
    last_seen_unix: float
    def __init__(self, client_id: _Optional[str] = ..., name: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix: _Optional[float] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "name", "state", "current_round", "rounds", "history", "clients", "message", "base_model", "base_metrics_json", "scheduling")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    current_round: int
    rounds: int
    history: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    clients: _containers.RepeatedCompositeFieldContainer[ClientSummary]
    message: str
    base_model: str
    base_metrics_json: str
    scheduling: Scheduling
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., current_round: _Optional[int] = ..., rounds: _Optional[int] = ..., history: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., clients: _Optional[_Iterable[_Union[ClientSummary, _Mapping]]] = ..., message: _Optional[str] = ..., base_model: _Optional[str] = ..., base_metrics_json: _Optional[str] = ..., scheduling: _Optional[_Union[Scheduling, _Mapping]] = ...) -> None: ...

class Scheduling(_message.Message):
    __slots__ = ("priority", "cpus", "gpus", "memory_gb", "queue_position", "reason", "backend", "engine_restarts")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    priority: int
    cpus: float
    gpus: float
    memory_gb: float
    queue_position: int
    reason: str
    backend: str
    engine_restarts: int
    def __init__(self, priority: _Optional[int] = ..., cpus: _Optional[float] = ..., gpus: _Optional[float] = ..., memory_gb: _Optional[float] = ..., queue_position: _Optional[int] = ..., reason: _Optional[str] = ..., backend: _Optional[str] = ..., engine_restarts: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("job_id", "uses", "ttl_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    uses: int
    ttl_seconds: int
    def __init__(self, job_id: _Optional[str] = ..., uses: _Optional[int] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateTokenReply(_message.Message):
    __slots__ = ("token", "expires_unix", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_unix: float
    token_id: str
    def __init__(self, token: _Optional[str] = ..., expires_unix: _Optional[float] = ..., token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RevokeTokenReply(_message.Message):
    __slots__ = ("token_id", "clients")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    clients: int
    def __init__(self, token_id: _Optional[str] = ..., clients: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorInfo(_message.Message):
    __slots__ = ("version", "signing_public_key")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    version: str
    signing_public_key: bytes
    def __init__(self, version: _Optional[str] = ..., signing_public_key: _Optional[bytes] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("job_id", "tag")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tag: str
    def __init__(self, job_id: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("job_id", "round", "path", "manifest_json", "tags")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    path: str
    manifest_json: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., path: _Optional[str] = ..., manifest_json: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAdaptersReply(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class PullAdapterRequest(_message.Message):
    __slots__ = ("job_id", "round", "tag")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    tag: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("path", "sha256", "chunk", "round")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    chunk: Chunk
    round: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class TagAdapterRequest(_message.Message):
    __slots__ = ("job_id", "round", "tag")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    tag: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class UntagAdapterRequest(_message.Message):
    __slots__ = ("job_id", "tag")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tag: str
    def __init__(self, job_id: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class TagAdapterReply(_message.Message):
    __slots__ = ("job_id", "tag", "round", "previous_round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tag: str
    round: int
    previous_round: int
    def __init__(self, job_id: _Optional[str] = ..., tag: _Optional[str] = ..., round: _Optional[int] = ..., previous_round: _Optional[int] = ...) -> None: ...
