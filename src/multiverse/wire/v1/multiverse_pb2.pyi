from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Resources(_message.Message):
    __slots__ = ("cpus", "memory", "disk")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    cpus: int
    memory: int
    disk: int
    def __init__(self, cpus: _Optional[int] = ..., memory: _Optional[int] = ..., disk: _Optional[int] = ...) -> None: ...

class InstanceSpec(_message.Message):
    __slots__ = ("id", "name", "cpus", "memory", "disk", "image", "user_data", "labels", "nic")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    USER_DATA_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NIC_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    cpus: int
    memory: int
    disk: int
    image: str
    user_data: str
    labels: _containers.ScalarMap[str, str]
    nic: Nic
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., cpus: _Optional[int] = ..., memory: _Optional[int] = ..., disk: _Optional[int] = ..., image: _Optional[str] = ..., user_data: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., nic: _Optional[_Union[Nic, _Mapping]] = ...) -> None: ...

class Publish(_message.Message):
    __slots__ = ("host_port", "guest_port", "protocol")
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    GUEST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    host_port: int
    guest_port: int
    protocol: str
    def __init__(self, host_port: _Optional[int] = ..., guest_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class Nic(_message.Message):
    __slots__ = ("address", "mac", "gateway", "dns", "domain", "publish")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    address: str
    mac: str
    gateway: str
    dns: str
    domain: str
    publish: _containers.RepeatedCompositeFieldContainer[Publish]
    def __init__(self, address: _Optional[str] = ..., mac: _Optional[str] = ..., gateway: _Optional[str] = ..., dns: _Optional[str] = ..., domain: _Optional[str] = ..., publish: _Optional[_Iterable[_Union[Publish, _Mapping]]] = ...) -> None: ...

class NetworkPlan(_message.Message):
    __slots__ = ("name", "cidr", "nat", "vni", "gateway", "underlay", "peers", "records", "nics")
    class RecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NicsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Nic
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Nic, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    NAT_FIELD_NUMBER: _ClassVar[int]
    VNI_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    cidr: str
    nat: bool
    vni: int
    gateway: str
    underlay: str
    peers: _containers.RepeatedScalarFieldContainer[str]
    records: _containers.ScalarMap[str, str]
    nics: _containers.MessageMap[str, Nic]
    def __init__(self, name: _Optional[str] = ..., cidr: _Optional[str] = ..., nat: _Optional[bool] = ..., vni: _Optional[int] = ..., gateway: _Optional[str] = ..., underlay: _Optional[str] = ..., peers: _Optional[_Iterable[str]] = ..., records: _Optional[_Mapping[str, str]] = ..., nics: _Optional[_Mapping[str, Nic]] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("id", "name", "state", "ipv4", "message", "version", "release")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IPV4_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: str
    ipv4: str
    message: str
    version: int
    release: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., ipv4: _Optional[str] = ..., message: _Optional[str] = ..., version: _Optional[int] = ..., release: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("name", "agent_address", "driver", "labels", "capacity", "version", "network_mode")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    agent_address: str
    driver: str
    labels: _containers.ScalarMap[str, str]
    capacity: Resources
    version: str
    network_mode: str
    def __init__(self, name: _Optional[str] = ..., agent_address: _Optional[str] = ..., driver: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., version: _Optional[str] = ..., network_mode: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "name", "agent_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    agent_address: str
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., agent_address: _Optional[str] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("name", "kind", "digest", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    digest: str
    size: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("cpus", "memory", "disk")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    cpus: float
    memory: int
    disk: int
    def __init__(self, cpus: _Optional[float] = ..., memory: _Optional[int] = ..., disk: _Optional[int] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("capacity", "instances", "images", "used", "delta", "removed")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    capacity: Resources
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    used: Usage
    delta: bool
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, capacity: _Optional[_Union[Resources, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ..., used: _Optional[_Union[Usage, _Mapping]] = ..., delta: _Optional[bool] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncAck(_message.Message):
    __slots__ = ("network", "faults", "full")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    network: NetworkPlan
    faults: NodeFaults
    full: bool
    def __init__(self, network: _Optional[_Union[NetworkPlan, _Mapping]] = ..., faults: _Optional[_Union[NodeFaults, _Mapping]] = ..., full: _Optional[bool] = ...) -> None: ...

class Param(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class LinkRule(_message.Message):
    __slots__ = ("fault_id", "instance_id", "sources", "params")
    FAULT_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    fault_id: str
    instance_id: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.RepeatedCompositeFieldContainer[Param]
    def __init__(self, fault_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ...) -> None: ...

class Shot(_message.Message):
    __slots__ = ("fault_id", "kind", "instance_id", "params")
    FAULT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    fault_id: str
    kind: str
    instance_id: str
    params: _containers.RepeatedCompositeFieldContainer[Param]
    def __init__(self, fault_id: _Optional[str] = ..., kind: _Optional[str] = ..., instance_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ...) -> None: ...

class Drop(_message.Message):
    __slots__ = ("source", "destination")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    source: str
    destination: str
    def __init__(self, source: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class NodeFaults(_message.Message):
    __slots__ = ("drops", "links", "shots", "generation")
    DROPS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    drops: _containers.RepeatedCompositeFieldContainer[Drop]
    links: _containers.RepeatedCompositeFieldContainer[LinkRule]
    shots: _containers.RepeatedCompositeFieldContainer[Shot]
    generation: int
    def __init__(self, drops: _Optional[_Iterable[_Union[Drop, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkRule, _Mapping]]] = ..., shots: _Optional[_Iterable[_Union[Shot, _Mapping]]] = ..., generation: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: str
    def __init__(self, csr: _Optional[str] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate",)
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: str
    def __init__(self, certificate: _Optional[str] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ImageManifest(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class InstanceRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class LaunchRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("id", "force")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    force: bool
    def __init__(self, id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("status", "load1", "load5", "load15", "memory_used", "memory_total", "disk_used", "disk_total", "release")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    status: InstanceStatus
    load1: float
    load5: float
    load15: float
    memory_used: int
    memory_total: int
    disk_used: int
    disk_total: int
    release: str
    def __init__(self, status: _Optional[_Union[InstanceStatus, _Mapping]] = ..., load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., memory_used: _Optional[int] = ..., memory_total: _Optional[int] = ..., disk_used: _Optional[int] = ..., disk_total: _Optional[int] = ..., release: _Optional[str] = ...) -> None: ...

class InstanceRefs(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoResult(_message.Message):
    __slots__ = ("id", "info", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    info: InstanceInfo
    error: str
    def __init__(self, id: _Optional[str] = ..., info: _Optional[_Union[InstanceInfo, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class InfoResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InfoResult]
    def __init__(self, results: _Optional[_Iterable[_Union[InfoResult, _Mapping]]] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("id", "command", "stdin")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    command: _containers.RepeatedScalarFieldContainer[str]
    stdin: bytes
    def __init__(self, id: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., stdin: _Optional[bytes] = ...) -> None: ...

class ExecOutput(_message.Message):
    __slots__ = ("stream", "data", "exited", "exit_code")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    stream: int
    data: bytes
    exited: bool
    exit_code: int
    def __init__(self, stream: _Optional[int] = ..., data: _Optional[bytes] = ..., exited: _Optional[bool] = ..., exit_code: _Optional[int] = ...) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("cols", "rows")
    COLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    cols: int
    rows: int
    def __init__(self, cols: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("id", "command", "tty", "size")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    command: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    size: TerminalSize
    def __init__(self, id: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ..., size: _Optional[_Union[TerminalSize, _Mapping]] = ...) -> None: ...

class SessionInput(_message.Message):
    __slots__ = ("start", "data", "resize", "eof")
    START_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    data: bytes
    resize: TerminalSize
    eof: bool
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., data: _Optional[bytes] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ..., eof: _Optional[bool] = ...) -> None: ...

class SessionOutput(_message.Message):
    __slots__ = ("data", "exit_code")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    exit_code: int
    def __init__(self, data: _Optional[bytes] = ..., exit_code: _Optional[int] = ...) -> None: ...

class SessionTicket(_message.Message):
    __slots__ = ("ticket", "port", "expires_in")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    port: int
    expires_in: float
    def __init__(self, ticket: _Optional[str] = ..., port: _Optional[int] = ..., expires_in: _Optional[float] = ...) -> None: ...

class SshLoginRequest(_message.Message):
    __slots__ = ("id", "public_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    public_key: str
    def __init__(self, id: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...

class SshLogin(_message.Message):
    __slots__ = ("host", "port", "user", "host_key", "expires_in")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HOST_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    user: str
    host_key: str
    expires_in: float
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., user: _Optional[str] = ..., host_key: _Optional[str] = ..., expires_in: _Optional[float] = ...) -> None: ...

class LogsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("digest", "done", "total")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    digest: str
    done: int
    total: int
    def __init__(self, digest: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class MoveFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("id", "target_node_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    target_node_id: str
    def __init__(self, id: _Optional[str] = ..., target_node_id: _Optional[str] = ...) -> None: ...

class ExportManifest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[MoveFile]
    def __init__(self, files: _Optional[_Iterable[_Union[MoveFile, _Mapping]]] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("id", "name", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    offset: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "zeros")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ZEROS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    zeros: int
    def __init__(self, data: _Optional[bytes] = ..., zeros: _Optional[int] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("spec", "source_node_id", "source_address", "files")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    source_node_id: str
    source_address: str
    files: _containers.RepeatedCompositeFieldContainer[MoveFile]
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ..., source_node_id: _Optional[str] = ..., source_address: _Optional[str] = ..., files: _Optional[_Iterable[_Union[MoveFile, _Mapping]]] = ...) -> None: ...

class ImportProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "status")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    status: InstanceStatus
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., status: _Optional[_Union[InstanceStatus, _Mapping]] = ...) -> None: ...

class AbortImportRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PrepareIncomingRequest(_message.Message):
    __slots__ = ("spec", "listen_host")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LISTEN_HOST_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    listen_host: str
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ..., listen_host: _Optional[str] = ...) -> None: ...

class IncomingEndpoint(_message.Message):
    __slots__ = ("host", "nbd_port", "migration_port", "tls_hostname", "login_key")
    HOST_FIELD_NUMBER: _ClassVar[int]
    NBD_PORT_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_PORT_FIELD_NUMBER: _ClassVar[int]
    TLS_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LOGIN_KEY_FIELD_NUMBER: _ClassVar[int]
    host: str
    nbd_port: int
    migration_port: int
    tls_hostname: str
    login_key: str
    def __init__(self, host: _Optional[str] = ..., nbd_port: _Optional[int] = ..., migration_port: _Optional[int] = ..., tls_hostname: _Optional[str] = ..., login_key: _Optional[str] = ...) -> None: ...

class MigrateOutRequest(_message.Message):
    __slots__ = ("id", "target")
    ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    target: IncomingEndpoint
    def __init__(self, id: _Optional[str] = ..., target: _Optional[_Union[IncomingEndpoint, _Mapping]] = ...) -> None: ...

class LiveProgress(_message.Message):
    __slots__ = ("phase", "disk_done", "disk_total", "memory_done", "memory_total", "downtime", "host_key", "done")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DISK_DONE_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_DONE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_FIELD_NUMBER: _ClassVar[int]
    HOST_KEY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    disk_done: int
    disk_total: int
    memory_done: int
    memory_total: int
    downtime: float
    host_key: str
    done: bool
    def __init__(self, phase: _Optional[str] = ..., disk_done: _Optional[int] = ..., disk_total: _Optional[int] = ..., memory_done: _Optional[int] = ..., memory_total: _Optional[int] = ..., downtime: _Optional[float] = ..., host_key: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

class FinishIncomingRequest(_message.Message):
    __slots__ = ("id", "host_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    HOST_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    host_key: str
    def __init__(self, id: _Optional[str] = ..., host_key: _Optional[str] = ...) -> None: ...
