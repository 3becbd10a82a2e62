from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_TRAINING: _ClassVar[Stage]
    STAGE_SHARE_KEYS: _ClassVar[Stage]
    STAGE_MASKED_INPUT: _ClassVar[Stage]
    STAGE_CONSISTENCY: _ClassVar[Stage]
    STAGE_UNMASKING: _ClassVar[Stage]
    STAGE_EVALUATION: _ClassVar[Stage]
    STAGE_COMMIT: _ClassVar[Stage]
    STAGE_REVEAL: _ClassVar[Stage]

class RoundPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_PURPOSE_TRAIN: _ClassVar[RoundPurpose]
    ROUND_PURPOSE_EVALUATE: _ClassVar[RoundPurpose]

class ShareComplaintKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_COMPLAINT_KIND_UNSPECIFIED: _ClassVar[ShareComplaintKind]
    SHARE_COMPLAINT_KIND_UNDECRYPTABLE: _ClassVar[ShareComplaintKind]
    SHARE_COMPLAINT_KIND_BAD_SIGNATURE: _ClassVar[ShareComplaintKind]
    SHARE_COMPLAINT_KIND_BAD_KEY: _ClassVar[ShareComplaintKind]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK_SEED: _ClassVar[ShareKind]
    SHARE_KIND_MASKING_KEY: _ClassVar[ShareKind]

class RoundOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_OUTCOME_UNSPECIFIED: _ClassVar[RoundOutcome]
    ROUND_OUTCOME_COMPLETED: _ClassVar[RoundOutcome]
    ROUND_OUTCOME_ABORTED: _ClassVar[RoundOutcome]
    ROUND_OUTCOME_DROPPED: _ClassVar[RoundOutcome]
STAGE_UNSPECIFIED: Stage
STAGE_TRAINING: Stage
STAGE_SHARE_KEYS: Stage
STAGE_MASKED_INPUT: Stage
STAGE_CONSISTENCY: Stage
STAGE_UNMASKING: Stage
STAGE_EVALUATION: Stage
STAGE_COMMIT: Stage
STAGE_REVEAL: Stage
ROUND_PURPOSE_TRAIN: RoundPurpose
ROUND_PURPOSE_EVALUATE: RoundPurpose
SHARE_COMPLAINT_KIND_UNSPECIFIED: ShareComplaintKind
SHARE_COMPLAINT_KIND_UNDECRYPTABLE: ShareComplaintKind
SHARE_COMPLAINT_KIND_BAD_SIGNATURE: ShareComplaintKind
SHARE_COMPLAINT_KIND_BAD_KEY: ShareComplaintKind
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK_SEED: ShareKind
SHARE_KIND_MASKING_KEY: ShareKind
ROUND_OUTCOME_UNSPECIFIED: RoundOutcome
ROUND_OUTCOME_COMPLETED: RoundOutcome
ROUND_OUTCOME_ABORTED: RoundOutcome
ROUND_OUTCOME_DROPPED: RoundOutcome

class RequestHeader(_message.Message):
    __slots__ = ("protocol_version", "session_id", "run_id", "round", "round_nonce", "sequence")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_NONCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    run_id: str
    round: int
    round_nonce: bytes
    sequence: int
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., round_nonce: _Optional[bytes] = ..., sequence: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("round", "stage", "detail")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: Stage
    detail: str
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("version", "tensors", "data", "sha256", "size_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    data: bytes
    sha256: bytes
    size_bytes: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("header", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    version: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class MaskedInputChunk(_message.Message):
    __slots__ = ("header", "total_bytes", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    total_bytes: int
    data: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "task_name", "client_version", "num_examples", "identity_public_key", "identity_credential", "trust_server", "evaluates", "evaluates_under_local_dp")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    TRUST_SERVER_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_UNDER_LOCAL_DP_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_name: str
    client_version: str
    num_examples: int
    identity_public_key: bytes
    identity_credential: bytes
    trust_server: bool
    evaluates: bool
    evaluates_under_local_dp: bool
    def __init__(self, protocol_version: _Optional[int] = ..., task_name: _Optional[str] = ..., client_version: _Optional[str] = ..., num_examples: _Optional[int] = ..., identity_public_key: _Optional[bytes] = ..., identity_credential: _Optional[bytes] = ..., trust_server: _Optional[bool] = ..., evaluates: _Optional[bool] = ..., evaluates_under_local_dp: _Optional[bool] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("session_id", "run_id", "client_name", "job", "poll_interval_ms", "max_message_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    run_id: str
    client_name: str
    job: JobInfo
    poll_interval_ms: int
    max_message_bytes: int
    def __init__(self, session_id: _Optional[bytes] = ..., run_id: _Optional[str] = ..., client_name: _Optional[str] = ..., job: _Optional[_Union[JobInfo, _Mapping]] = ..., poll_interval_ms: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("task_name", "total_rounds", "completed_rounds", "clients_per_round", "min_clients", "secagg_graph", "dp_mode", "active_adversary", "consortium", "evaluation", "max_corrupt_fraction", "model")
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_GRAPH_FIELD_NUMBER: _ClassVar[int]
    DP_MODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ADVERSARY_FIELD_NUMBER: _ClassVar[int]
    CONSORTIUM_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    MAX_CORRUPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    task_name: str
    total_rounds: int
    completed_rounds: int
    clients_per_round: int
    min_clients: int
    secagg_graph: str
    dp_mode: str
    active_adversary: bool
    consortium: str
    evaluation: str
    max_corrupt_fraction: float
    model: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, task_name: _Optional[str] = ..., total_rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., min_clients: _Optional[int] = ..., secagg_graph: _Optional[str] = ..., dp_mode: _Optional[str] = ..., active_adversary: _Optional[bool] = ..., consortium: _Optional[str] = ..., evaluation: _Optional[str] = ..., max_corrupt_fraction: _Optional[float] = ..., model: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("header", "max_wait_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    max_wait_ms: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class PollResponse(_message.Message):
    __slots__ = ("wait", "round_start", "peer_keys", "incoming_shares", "survivor_check", "unmasking", "round_result", "evaluate", "job_done", "commitments", "contributions")
    WAIT_FIELD_NUMBER: _ClassVar[int]
    ROUND_START_FIELD_NUMBER: _ClassVar[int]
    PEER_KEYS_FIELD_NUMBER: _ClassVar[int]
    INCOMING_SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_CHECK_FIELD_NUMBER: _ClassVar[int]
    UNMASKING_FIELD_NUMBER: _ClassVar[int]
    ROUND_RESULT_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    JOB_DONE_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    wait: Wait
    round_start: RoundStart
    peer_keys: PeerKeys
    incoming_shares: IncomingShares
    survivor_check: SurvivorCheck
    unmasking: UnmaskingRequest
    round_result: RoundResult
    evaluate: Evaluate
    job_done: JobDone
    commitments: Commitments
    contributions: Contributions
    def __init__(self, wait: _Optional[_Union[Wait, _Mapping]] = ..., round_start: _Optional[_Union[RoundStart, _Mapping]] = ..., peer_keys: _Optional[_Union[PeerKeys, _Mapping]] = ..., incoming_shares: _Optional[_Union[IncomingShares, _Mapping]] = ..., survivor_check: _Optional[_Union[SurvivorCheck, _Mapping]] = ..., unmasking: _Optional[_Union[UnmaskingRequest, _Mapping]] = ..., round_result: _Optional[_Union[RoundResult, _Mapping]] = ..., evaluate: _Optional[_Union[Evaluate, _Mapping]] = ..., job_done: _Optional[_Union[JobDone, _Mapping]] = ..., commitments: _Optional[_Union[Commitments, _Mapping]] = ..., contributions: _Optional[_Union[Contributions, _Mapping]] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class EncodingParams(_message.Message):
    __slots__ = ("ring_bits", "clip_range", "fractional_bits", "dimension", "extra_coordinates", "weighted", "max_weight", "evaluation")
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    FRACTIONAL_BITS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_COORDINATES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ring_bits: int
    clip_range: float
    fractional_bits: int
    dimension: int
    extra_coordinates: _containers.RepeatedScalarFieldContainer[str]
    weighted: bool
    max_weight: float
    evaluation: EvaluationEncoding
    def __init__(self, ring_bits: _Optional[int] = ..., clip_range: _Optional[float] = ..., fractional_bits: _Optional[int] = ..., dimension: _Optional[int] = ..., extra_coordinates: _Optional[_Iterable[str]] = ..., weighted: _Optional[bool] = ..., max_weight: _Optional[float] = ..., evaluation: _Optional[_Union[EvaluationEncoding, _Mapping]] = ...) -> None: ...

class EvaluationEncoding(_message.Message):
    __slots__ = ("metrics", "clip", "fractional_bits", "dimension", "limb_bits", "limbs", "max_examples")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    FRACTIONAL_BITS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    LIMB_BITS_FIELD_NUMBER: _ClassVar[int]
    LIMBS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    clip: float
    fractional_bits: int
    dimension: int
    limb_bits: int
    limbs: int
    max_examples: int
    def __init__(self, metrics: _Optional[_Iterable[str]] = ..., clip: _Optional[float] = ..., fractional_bits: _Optional[int] = ..., dimension: _Optional[int] = ..., limb_bits: _Optional[int] = ..., limbs: _Optional[int] = ..., max_examples: _Optional[int] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("graph", "degree", "threshold", "graph_seed", "active_adversary", "cohort_size", "cohort", "round_id", "context", "identity_keys", "max_corrupt_fraction", "identity_credentials")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ADVERSARY_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_CORRUPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    graph: str
    degree: int
    threshold: int
    graph_seed: bytes
    active_adversary: bool
    cohort_size: int
    cohort: _containers.RepeatedScalarFieldContainer[int]
    round_id: int
    context: bytes
    identity_keys: _containers.RepeatedScalarFieldContainer[bytes]
    max_corrupt_fraction: float
    identity_credentials: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, graph: _Optional[str] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ..., graph_seed: _Optional[bytes] = ..., active_adversary: _Optional[bool] = ..., cohort_size: _Optional[int] = ..., cohort: _Optional[_Iterable[int]] = ..., round_id: _Optional[int] = ..., context: _Optional[bytes] = ..., identity_keys: _Optional[_Iterable[bytes]] = ..., max_corrupt_fraction: _Optional[float] = ..., identity_credentials: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DistributedDpParams(_message.Message):
    __slots__ = ("mechanism", "l2_clip", "scale", "noise_stddev", "beta", "bits", "rotation_seed", "padded_dimension", "config_json")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    L2_CLIP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NOISE_STDDEV_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    PADDED_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    l2_clip: float
    scale: float
    noise_stddev: float
    beta: float
    bits: int
    rotation_seed: bytes
    padded_dimension: int
    config_json: str
    def __init__(self, mechanism: _Optional[str] = ..., l2_clip: _Optional[float] = ..., scale: _Optional[float] = ..., noise_stddev: _Optional[float] = ..., beta: _Optional[float] = ..., bits: _Optional[int] = ..., rotation_seed: _Optional[bytes] = ..., padded_dimension: _Optional[int] = ..., config_json: _Optional[str] = ...) -> None: ...

class LocalDpParams(_message.Message):
    __slots__ = ("noise_multiplier", "max_grad_norm", "target_epsilon", "delta", "planned_rounds", "max_physical_batch_size", "accountant")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    PLANNED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PHYSICAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    planned_rounds: int
    max_physical_batch_size: int
    accountant: str
    def __init__(self, noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., planned_rounds: _Optional[int] = ..., max_physical_batch_size: _Optional[int] = ..., accountant: _Optional[str] = ...) -> None: ...

class DpParams(_message.Message):
    __slots__ = ("mode", "update_clip_norm", "adaptive_clipping", "local", "distributed", "noise_multiplier")
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_CLIPPING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    mode: str
    update_clip_norm: float
    adaptive_clipping: bool
    local: LocalDpParams
    distributed: DistributedDpParams
    noise_multiplier: float
    def __init__(self, mode: _Optional[str] = ..., update_clip_norm: _Optional[float] = ..., adaptive_clipping: _Optional[bool] = ..., local: _Optional[_Union[LocalDpParams, _Mapping]] = ..., distributed: _Optional[_Union[DistributedDpParams, _Mapping]] = ..., noise_multiplier: _Optional[float] = ...) -> None: ...

class TrainingParams(_message.Message):
    __slots__ = ("local_epochs", "learning_rate", "batch_size", "evaluate_global_model", "seed")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_GLOBAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    learning_rate: float
    batch_size: int
    evaluate_global_model: bool
    seed: int
    def __init__(self, local_epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., evaluate_global_model: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class RoundStart(_message.Message):
    __slots__ = ("run_id", "round", "round_nonce", "client_id", "model", "encoding", "secagg", "dp", "training", "deadline_unix_ms", "stage_timeout_ms", "attempt", "purpose")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    round_nonce: bytes
    client_id: int
    model: Model
    encoding: EncodingParams
    secagg: SecAggParams
    dp: DpParams
    training: TrainingParams
    deadline_unix_ms: int
    stage_timeout_ms: int
    attempt: int
    purpose: RoundPurpose
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., round_nonce: _Optional[bytes] = ..., client_id: _Optional[int] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., encoding: _Optional[_Union[EncodingParams, _Mapping]] = ..., secagg: _Optional[_Union[SecAggParams, _Mapping]] = ..., dp: _Optional[_Union[DpParams, _Mapping]] = ..., training: _Optional[_Union[TrainingParams, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., stage_timeout_ms: _Optional[int] = ..., attempt: _Optional[int] = ..., purpose: _Optional[_Union[RoundPurpose, str]] = ...) -> None: ...

class RoundResponse(_message.Message):
    __slots__ = ("header", "accept", "commitment", "decline_reason", "weight", "refused_members", "out_of_budget", "cannot_evaluate", "released_over_model")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    DECLINE_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CANNOT_EVALUATE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_OVER_MODEL_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    accept: bool
    commitment: bytes
    decline_reason: str
    weight: float
    refused_members: _containers.RepeatedScalarFieldContainer[int]
    out_of_budget: bool
    cannot_evaluate: bool
    released_over_model: bool
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., accept: _Optional[bool] = ..., commitment: _Optional[bytes] = ..., decline_reason: _Optional[str] = ..., weight: _Optional[float] = ..., refused_members: _Optional[_Iterable[int]] = ..., out_of_budget: _Optional[bool] = ..., cannot_evaluate: _Optional[bool] = ..., released_over_model: _Optional[bool] = ...) -> None: ...

class SeedCommitment(_message.Message):
    __slots__ = ("client_id", "commitment")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    commitment: bytes
    def __init__(self, client_id: _Optional[int] = ..., commitment: _Optional[bytes] = ...) -> None: ...

class Commitments(_message.Message):
    __slots__ = ("round", "commitments", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    commitments: _containers.RepeatedCompositeFieldContainer[SeedCommitment]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., commitments: _Optional[_Iterable[_Union[SeedCommitment, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class RevealRequest(_message.Message):
    __slots__ = ("header", "contribution")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    contribution: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., contribution: _Optional[bytes] = ...) -> None: ...

class SeedReveal(_message.Message):
    __slots__ = ("client_id", "contribution")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    contribution: bytes
    def __init__(self, client_id: _Optional[int] = ..., contribution: _Optional[bytes] = ...) -> None: ...

class Contributions(_message.Message):
    __slots__ = ("round", "reveals", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REVEALS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    reveals: _containers.RepeatedCompositeFieldContainer[SeedReveal]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., reveals: _Optional[_Iterable[_Union[SeedReveal, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("header", "encryption_public_key", "masking_public_key", "signature", "share_key_proof")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASKING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEY_PROOF_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    encryption_public_key: bytes
    masking_public_key: bytes
    signature: bytes
    share_key_proof: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., encryption_public_key: _Optional[bytes] = ..., masking_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., share_key_proof: _Optional[bytes] = ...) -> None: ...

class AdvertisedKeys(_message.Message):
    __slots__ = ("client_id", "encryption_public_key", "masking_public_key", "signature", "identity_public_key", "share_key_proof")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASKING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEY_PROOF_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    encryption_public_key: bytes
    masking_public_key: bytes
    signature: bytes
    identity_public_key: bytes
    share_key_proof: bytes
    def __init__(self, client_id: _Optional[int] = ..., encryption_public_key: _Optional[bytes] = ..., masking_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ..., share_key_proof: _Optional[bytes] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("round", "keys", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    keys: _containers.RepeatedCompositeFieldContainer[AdvertisedKeys]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[AdvertisedKeys, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("peer_id", "ciphertext")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    peer_id: int
    ciphertext: bytes
    def __init__(self, peer_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("header", "shares")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class IncomingShares(_message.Message):
    __slots__ = ("round", "shares", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class MaskedInputRequest(_message.Message):
    __slots__ = ("header", "masked_vector")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MASKED_VECTOR_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    masked_vector: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., masked_vector: _Optional[bytes] = ...) -> None: ...

class ShareComplaint(_message.Message):
    __slots__ = ("sender_id", "kind", "shared_point", "proof")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARED_POINT_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    sender_id: int
    kind: ShareComplaintKind
    shared_point: bytes
    proof: bytes
    def __init__(self, sender_id: _Optional[int] = ..., kind: _Optional[_Union[ShareComplaintKind, str]] = ..., shared_point: _Optional[bytes] = ..., proof: _Optional[bytes] = ...) -> None: ...

class ShareComplaintsRequest(_message.Message):
    __slots__ = ("header", "complaints")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    COMPLAINTS_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    complaints: _containers.RepeatedCompositeFieldContainer[ShareComplaint]
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., complaints: _Optional[_Iterable[_Union[ShareComplaint, _Mapping]]] = ...) -> None: ...

class SurvivorCheck(_message.Message):
    __slots__ = ("round", "survivors", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class ConfirmSurvivorsRequest(_message.Message):
    __slots__ = ("header", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    signature: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SurvivorSignature(_message.Message):
    __slots__ = ("client_id", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    signature: bytes
    def __init__(self, client_id: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UnmaskingRequest(_message.Message):
    __slots__ = ("round", "survivors", "dropped", "signatures", "deadline_unix_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    signatures: _containers.RepeatedCompositeFieldContainer[SurvivorSignature]
    deadline_unix_ms: int
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ..., signatures: _Optional[_Iterable[_Union[SurvivorSignature, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner_id", "kind", "share", "salt")
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    owner_id: int
    kind: ShareKind
    share: bytes
    salt: bytes
    def __init__(self, owner_id: _Optional[int] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ..., salt: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("header", "shares")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("round", "outcome", "reason", "survivors", "new_model_version")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    outcome: RoundOutcome
    reason: str
    survivors: int
    new_model_version: int
    def __init__(self, round: _Optional[int] = ..., outcome: _Optional[_Union[RoundOutcome, str]] = ..., reason: _Optional[str] = ..., survivors: _Optional[int] = ..., new_model_version: _Optional[int] = ...) -> None: ...

class Evaluate(_message.Message):
    __slots__ = ("round", "model", "deadline_unix_ms", "round_nonce", "phase")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NONCE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    round: int
    model: Model
    deadline_unix_ms: int
    round_nonce: bytes
    phase: int
    def __init__(self, round: _Optional[int] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., round_nonce: _Optional[bytes] = ..., phase: _Optional[int] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class LocalPrivacySpend(_message.Message):
    __slots__ = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., accountant: _Optional[str] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("header", "model_version", "num_examples", "metrics", "privacy")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    model_version: int
    num_examples: int
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    privacy: LocalPrivacySpend
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., model_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., privacy: _Optional[_Union[LocalPrivacySpend, _Mapping]] = ...) -> None: ...

class JobDone(_message.Message):
    __slots__ = ("run_id", "completed_rounds", "final_metrics", "summary")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    completed_rounds: int
    final_metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    summary: str
    def __init__(self, run_id: _Optional[str] = ..., completed_rounds: _Optional[int] = ..., final_metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., summary: _Optional[str] = ...) -> None: ...
