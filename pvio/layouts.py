"""Wire layouts of Xen's public I/O headers, declared once with construct.

This module is the single source of truth for every structure that crosses a
pvio process boundary. The C declarations compiled by cffi, the ``struct``
formats used on hot paths and the tables in ``specs/layouts.md`` are all
derived from these declarations by :mod:`pvio._cgen`, and the test-suite checks
sizes, offsets and constants against Xen's own headers (Debian ``libxen-dev``).

All fields are little-endian (x86_64 / arm64 ABI). C's implicit alignment
padding is spelled out as explicit ``Padding`` so that construct (which never
aligns) and C agree byte for byte.

Sources: ``xen/io/ring.h``, ``xen/io/blkif.h``, ``xen/io/netif.h``,
``xen/io/console.h``, ``xen/grant_table.h``, ``xen/io/xs_wire.h``,
``xen/io/xenbus.h`` (Xen 4.17).
"""

from __future__ import annotations

import enum

from construct import (
    Array,
    Bytes,
    Int8ul,
    Int16sl,
    Int16ul,
    Int32ul,
    Int64ul,
    Padded,
    Padding,
    Struct,
    Union,
)

# ---------------------------------------------------------------------------
# Generic sizes
# ---------------------------------------------------------------------------

XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT  # ring.h: ring pages are always 4 KiB


def union(size: int, *members):
    """A C union of ``size`` bytes (construct has no sized union of its own)."""
    return Padded(size, Union(0, *members))


# ---------------------------------------------------------------------------
# io/ring.h: the shared ring header (DEFINE_RING_TYPES' ``struct X_sring``)
# ---------------------------------------------------------------------------

sring_header = Struct(
    "req_prod" / Int32ul,
    "req_event" / Int32ul,
    "rsp_prod" / Int32ul,
    "rsp_event" / Int32ul,
    "pvt" / union(
        4,
        "netif_smartpoll_active" / Int8ul,
        "tapif_user_msg" / Int8ul,
        "pvt_pad" / Bytes(4),
    ),
    "__pad" / Bytes(44),
)
SRING_HEADER_SIZE = 64  # offsetof(struct X_sring, ring)

# DEFINE_XEN_FLEX_RING_AND_INTF(name): the index page of a byte ("flex") ring.
# ``ref[]`` is a flexible array of grant refs starting at offset 132.
flex_ring_intf = Struct(
    "in_cons" / Int32ul,
    "in_prod" / Int32ul,
    "pad1" / Bytes(56),
    "out_cons" / Int32ul,
    "out_prod" / Int32ul,
    "pad2" / Bytes(56),
    "ring_order" / Int32ul,
)


def flex_ring_size(order: int) -> int:
    """``XEN_FLEX_RING_SIZE(order)``: bytes in *each* direction of a flex ring."""
    return 1 << (order + XEN_PAGE_SHIFT - 1)


# ---------------------------------------------------------------------------
# io/blkif.h (x86_64 / native ABI)
# ---------------------------------------------------------------------------

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_SEGS_PER_INDIRECT_FRAME = XEN_PAGE_SIZE // 8  # 512 segments per page

blkif_request_segment = Struct(
    "gref" / Int32ul,
    "first_sect" / Int8ul,
    "last_sect" / Int8ul,
    Padding(2),
)

blkif_request = Struct(
    "operation" / Int8ul,
    "nr_segments" / Int8ul,
    "handle" / Int16ul,
    Padding(4),
    "id" / Int64ul,
    "sector_number" / Int64ul,
    "seg" / Array(BLKIF_MAX_SEGMENTS_PER_REQUEST, blkif_request_segment),
)

blkif_request_discard = Struct(
    "operation" / Int8ul,
    "flag" / Int8ul,
    "handle" / Int16ul,
    Padding(4),
    "id" / Int64ul,
    "sector_number" / Int64ul,
    "nr_sectors" / Int64ul,
)

blkif_request_indirect = Struct(
    "operation" / Int8ul,
    "indirect_op" / Int8ul,
    "nr_segments" / Int16ul,
    Padding(4),
    "id" / Int64ul,
    "sector_number" / Int64ul,
    "handle" / Int16ul,
    "_pad2" / Int16ul,
    "indirect_grefs" / Array(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, Int32ul),
    "_pad3" / Int32ul,
)

blkif_response = Struct(
    "id" / Int64ul,
    "operation" / Int8ul,
    Padding(1),
    "status" / Int16sl,
    Padding(4),
)


class BlkifOp(enum.IntEnum):
    """``BLKIF_OP_*`` (io/blkif.h)."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class BlkifRsp(enum.IntEnum):
    """``BLKIF_RSP_*`` (io/blkif.h)."""

    EOPNOTSUPP = -2
    ERROR = -1
    OKAY = 0


VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4
BLKIF_DISCARD_SECURE = 1 << 0

# ---------------------------------------------------------------------------
# io/netif.h
# ---------------------------------------------------------------------------

netif_tx_request = Struct(
    "gref" / Int32ul,
    "offset" / Int16ul,
    "flags" / Int16ul,
    "id" / Int16ul,
    "size" / Int16ul,
)

netif_tx_response = Struct(
    "id" / Int16ul,
    "status" / Int16sl,
)

netif_rx_request = Struct(
    "id" / Int16ul,
    "pad" / Int16ul,
    "gref" / Int32ul,
)

netif_rx_response = Struct(
    "id" / Int16ul,
    "offset" / Int16ul,
    "flags" / Int16ul,
    "status" / Int16sl,
)

netif_extra_info_gso = Struct(
    "size" / Int16ul,
    "type" / Int8ul,
    "pad" / Int8ul,
    "features" / Int16ul,
)
netif_extra_info_mcast = Struct("addr" / Bytes(6))
netif_extra_info_hash = Struct(
    "type" / Int8ul,
    "algorithm" / Int8ul,
    "value" / Bytes(4),
)

netif_extra_info = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "u" / union(
        6,
        "gso" / netif_extra_info_gso,
        "mcast" / netif_extra_info_mcast,
        "hash" / netif_extra_info_hash,
        "pad" / Array(3, Int16ul),
    ),
)


class NetTxFlag(enum.IntFlag):
    """``NETTXF_*`` (io/netif.h)."""

    CSUM_BLANK = 1 << 0
    DATA_VALIDATED = 1 << 1
    MORE_DATA = 1 << 2
    EXTRA_INFO = 1 << 3


class NetRxFlag(enum.IntFlag):
    """``NETRXF_*`` (io/netif.h). Note csum/validated swap relative to TX."""

    DATA_VALIDATED = 1 << 0
    CSUM_BLANK = 1 << 1
    MORE_DATA = 1 << 2
    EXTRA_INFO = 1 << 3
    GSO_PREFIX = 1 << 4


class NetifExtraType(enum.IntEnum):
    """``XEN_NETIF_EXTRA_TYPE_*`` (io/netif.h)."""

    NONE = 0
    GSO = 1
    MCAST_ADD = 2
    MCAST_DEL = 3
    HASH = 4


XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2
XEN_NETIF_NR_SLOTS_MIN = 18
XEN_NETIF_MAX_TX_SIZE = 0xFFFF


class NetifRsp(enum.IntEnum):
    """``XEN_NETIF_RSP_*`` (io/netif.h)."""

    DROPPED = -2
    ERROR = -1
    OKAY = 0
    NULL = 1


# ---------------------------------------------------------------------------
# io/console.h
# ---------------------------------------------------------------------------

XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048

xencons_interface = Struct(
    "in" / Bytes(XENCONS_IN_SIZE),
    "out" / Bytes(XENCONS_OUT_SIZE),
    "in_cons" / Int32ul,
    "in_prod" / Int32ul,
    "out_cons" / Int32ul,
    "out_prod" / Int32ul,
)

# ---------------------------------------------------------------------------
# grant_table.h
# ---------------------------------------------------------------------------

grant_entry_v1 = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
    "frame" / Int32ul,
)

GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1


class GTF(enum.IntFlag):
    """``GTF_*`` grant entry flags (grant_table.h)."""

    invalid = 0
    permit_access = 1
    accept_transfer = 2
    transitive = 3
    type_mask = 3
    readonly = 1 << 2
    reading = 1 << 3
    writing = 1 << 4
    PWT = 1 << 5
    PCD = 1 << 6
    PAT = 1 << 7
    sub_page = 1 << 8


class GNTST(enum.IntEnum):
    """``GNTST_*`` grant operation status codes (grant_table.h)."""

    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


GNTMAP_readonly = 1 << 2
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1
DOMID_SELF = 0x7FF0

# ---------------------------------------------------------------------------
# event_channel.h
# ---------------------------------------------------------------------------


class EvtchnStatus(enum.IntEnum):
    """``EVTCHNSTAT_*`` (event_channel.h)."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


EVTCHN_2L_NR_CHANNELS = 4096  # x86_64: sizeof(xen_ulong_t) * sizeof(xen_ulong_t) * 64

# ---------------------------------------------------------------------------
# io/xs_wire.h
# ---------------------------------------------------------------------------

xsd_sockmsg = Struct(
    "type" / Int32ul,
    "req_id" / Int32ul,
    "tx_id" / Int32ul,
    "len" / Int32ul,
)

XENSTORE_RING_SIZE = 1024

xenstore_domain_interface = Struct(
    "req" / Bytes(XENSTORE_RING_SIZE),
    "rsp" / Bytes(XENSTORE_RING_SIZE),
    "req_cons" / Int32ul,
    "req_prod" / Int32ul,
    "rsp_cons" / Int32ul,
    "rsp_prod" / Int32ul,
    "server_features" / Int32ul,
    "connection" / Int32ul,
    "error" / Int32ul,
)


class XsdSockmsgType(enum.IntEnum):
    """``enum xsd_sockmsg_type`` (io/xs_wire.h). Value 20 was removed."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    TYPE_COUNT = 23
    INVALID = 0xFFFF


XS_DEBUG = XsdSockmsgType.CONTROL  # the old name of XS_CONTROL
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

# ``xsd_errors[]`` in xs_wire.h, in its fixed order.
XSD_ERRORS = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

# ---------------------------------------------------------------------------
# io/xenbus.h
# ---------------------------------------------------------------------------


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (io/xenbus.h)."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


# ---------------------------------------------------------------------------
# Registry: every layout by its C name, in dependency order. _cgen derives the
# C declarations, struct formats and spec tables from this mapping.
# ---------------------------------------------------------------------------

LAYOUTS = {
    "sring_header": sring_header,
    "flex_ring_intf": flex_ring_intf,
    "blkif_request_segment": blkif_request_segment,
    "blkif_request": blkif_request,
    "blkif_request_discard": blkif_request_discard,
    "blkif_request_indirect": blkif_request_indirect,
    "blkif_response": blkif_response,
    "netif_tx_request": netif_tx_request,
    "netif_tx_response": netif_tx_response,
    "netif_rx_request": netif_rx_request,
    "netif_rx_response": netif_rx_response,
    "netif_extra_info_gso": netif_extra_info_gso,
    "netif_extra_info_mcast": netif_extra_info_mcast,
    "netif_extra_info_hash": netif_extra_info_hash,
    "netif_extra_info": netif_extra_info,
    "xencons_interface": xencons_interface,
    "grant_entry_v1": grant_entry_v1,
    "xsd_sockmsg": xsd_sockmsg,
    "xenstore_domain_interface": xenstore_domain_interface,
}

# The Xen C type each layout mirrors (for differential tests and specs/).
XEN_C_NAMES = {
    "sring_header": None,  # the header part of every ``struct X_sring``
    "flex_ring_intf": None,  # ``struct X_data_intf`` from DEFINE_XEN_FLEX_RING_AND_INTF
    "blkif_request_segment": "struct blkif_request_segment",
    "blkif_request": "struct blkif_request",
    "blkif_request_discard": "struct blkif_request_discard",
    "blkif_request_indirect": "struct blkif_request_indirect",
    "blkif_response": "struct blkif_response",
    "netif_tx_request": "struct netif_tx_request",
    "netif_tx_response": "struct netif_tx_response",
    "netif_rx_request": "struct netif_rx_request",
    "netif_rx_response": "struct netif_rx_response",
    "netif_extra_info_gso": None,
    "netif_extra_info_mcast": None,
    "netif_extra_info_hash": None,
    "netif_extra_info": "struct netif_extra_info",
    "xencons_interface": "struct xencons_interface",
    "grant_entry_v1": "struct grant_entry_v1",
    "xsd_sockmsg": "struct xsd_sockmsg",
    "xenstore_domain_interface": "struct xenstore_domain_interface",
}
