"""A cffi shim over Xen's own, unmodified public headers (Debian ``libxen-dev``).

The differential tests compare pvio against *this* module, never against
numbers copied from a document: every size, offset, constant and ring
decision here is computed by the C compiler from ``/usr/include/xen``.

What the shim contains (all generated into one cffi API-mode extension):

- the Xen headers, included as a C driver would: ``<stdint.h>``/``<string.h>``
  first (ring.h asks for them), ``__XEN_TOOLS__`` so that the latest interface
  version is selected and ring.h uses ``xen_mb()``/``xen_rmb()``/``xen_wmb()``,
  which we define before the include;
- ring types: ``blkif``, ``netif_tx``, ``netif_rx`` and ``xen_netif_ctrl`` as
  the headers declare them, plus three of our own: ``tiny`` (2-byte request,
  1-byte response), ``wide`` (4-byte request, 24-byte response: the response
  is the larger one) and ``odd`` (6-byte request, 4-byte but 4-aligned
  response: C pads the slot union to 8 bytes);
- per ring type, thin C functions that run exactly one ring.h macro (or the
  canonical driver loop around RING_GET/RING_COPY) on a page buffer passed
  from Python; the private ring state is the real ``struct X_front_ring`` /
  ``struct X_back_ring``, allocated by cffi;
- ``DEFINE_XEN_FLEX_RING_AND_INTF(test)``: ``test_read_packet``,
  ``test_write_packet``, ``test_queued``, ``test_mask``;
- a console reader/writer in the style of Linux hvc_xen / xenconsoled, built
  on ``MASK_XENCONS_IDX``;
- ``offsetof``/``sizeof`` of every member (recursively through anonymous
  structs/unions) of the Xen structs pvio mirrors. The member lists are not
  hand-written: they are enumerated by parsing the preprocessed headers with
  pycparser, so a member pvio forgot is noticed;
- the same for pvio's *generated* C structs (``pvio._cgen.c_declarations()``)
  compiled into the same translation unit;
- the value of every integer macro/enumerator of interest (enumerated from
  ``gcc -dM -E`` and the parsed enums) and ``xsd_errors[]``.

Build with :func:`build`, which caches the compiled module under a content
hash, so only a changed shim (or changed pvio layouts) is recompiled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import construct as c
from cffi import FFI
from pycparser import CParser, c_ast

from pvio import _cgen, layouts

XEN_INCLUDE_DIR = Path("/usr/include")
XEN_HEADERS = (
    "xen/xen.h",
    "xen/grant_table.h",
    "xen/event_channel.h",
    "xen/io/ring.h",
    "xen/io/blkif.h",
    "xen/io/netif.h",
    "xen/io/console.h",
    "xen/io/xs_wire.h",
    "xen/io/xenbus.h",
)

# Ring types compiled into the shim.
RING_TYPES = ("blkif", "netif_tx", "netif_rx", "xen_netif_ctrl", "tiny", "wide", "odd")

# Our own test types, declared with the header's own macros.
CUSTOM_TYPES = """
struct tiny_request { uint16_t v; };
struct tiny_response { uint8_t v; };
DEFINE_RING_TYPES(tiny, struct tiny_request, struct tiny_response);

struct wide_request { uint32_t v; };
struct wide_response { uint64_t a, b, c; };
DEFINE_RING_TYPES(wide, struct wide_request, struct wide_response);

/* The union of a 6-byte, 2-aligned request and a 4-byte, 4-aligned response
 * is 8 bytes: more than the larger member. */
struct odd_request { uint16_t a, b, c; };
struct odd_response { uint32_t v; };
DEFINE_RING_TYPES(odd, struct odd_request, struct odd_response);

DEFINE_XEN_FLEX_RING_AND_INTF(test);
"""

# The Xen structs whose members are enumerated (offsetof/sizeof of each).
XEN_STRUCTS = (
    "blkif_sring",
    "netif_tx_sring",
    "netif_rx_sring",
    "xen_netif_ctrl_sring",
    "tiny_sring",
    "wide_sring",
    "odd_sring",
    "test_data_intf",
    "blkif_request_segment",
    "blkif_request",
    "blkif_request_discard",
    "blkif_request_indirect",
    "blkif_response",
    "netif_tx_request",
    "netif_tx_response",
    "netif_rx_request",
    "netif_rx_response",
    "netif_extra_info",
    "xen_netif_ctrl_request",
    "xen_netif_ctrl_response",
    "xencons_interface",
    "grant_entry_v1",
    "xsd_sockmsg",
    "xenstore_domain_interface",
)

# Integer macros whose values are exported (object-like macros only).
_MACRO_RE = re.compile(
    r"^(BLKIF_|VDISK_|NETTXF_|NETRXF_|XEN_NETIF_|NETIF_RSP_|GTF_|GNTST_|GNTMAP_|"
    r"GNTCOPY_|GNTTAB_|DOMID_|EVTCHNSTAT_|EVTCHNOP_|EVTCHN_2L_|XENSTORE_|XS_|"
    r"XEN_PAGE_SHIFT$)"
)

# Constants pvio has that Xen only has as an expression (named SHIM_*).
DERIVED_CONSTANTS = {
    "SHIM_XEN_PAGE_SIZE": "(1L << XEN_PAGE_SHIFT)",
    "SHIM_SRING_HEADER_SIZE": "offsetof(struct blkif_sring, ring)",
    # Linux xen-blkfront/blkback: XEN_PAGE_SIZE / sizeof(struct blkif_request_segment)
    "SHIM_SEGS_PER_INDIRECT_FRAME":
        "((1L << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment))",
    "SHIM_XENCONS_IN_SIZE": "sizeof(((struct xencons_interface *)0)->in)",
    "SHIM_XENCONS_OUT_SIZE": "sizeof(((struct xencons_interface *)0)->out)",
    "SHIM_BLKIF_SRING_SIZE": "sizeof(struct blkif_sring)",
}

PRELUDE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>

/* Latest interface version (xen-compat.h), so that ring.h uses xen_*mb(). */
#define __XEN_TOOLS__ 1
#define xen_mb()  __sync_synchronize()
#define xen_rmb() __asm__ __volatile__("" ::: "memory")
#define xen_wmb() __asm__ __volatile__("" ::: "memory")
""" + "".join(f"#include <{h}>\n" for h in XEN_HEADERS) + r"""
#if __XEN_INTERFACE_VERSION__ < 0x00030208
#error "ring.h would use mb()/rmb()/wmb() instead of the xen_*mb() defined above"
#endif
"""

# --------------------------------------------------------------------------
# Per ring type: one C function per ring.h macro (or canonical driver loop).
# --------------------------------------------------------------------------

_RING_C = r"""
#define SHIM_RING(T)                                                          \
typedef __typeof__(((union T##_sring_entry *)0)->req) T##_shim_req_t;         \
typedef __typeof__(((union T##_sring_entry *)0)->rsp) T##_shim_rsp_t;         \
size_t T##_req_size(void) { return sizeof(T##_shim_req_t); }                  \
size_t T##_rsp_size(void) { return sizeof(T##_shim_rsp_t); }                  \
size_t T##_slot_size(void) { return sizeof(union T##_sring_entry); }          \
size_t T##_ring_offset(void) { return offsetof(struct T##_sring, ring); }     \
unsigned int T##_const_ring_size(size_t bytes)                                \
{ return __CONST_RING_SIZE(T, bytes); }                                       \
void T##_shared_ring_init(void *page)                                         \
{ SHARED_RING_INIT((struct T##_sring *)page); }                               \
void T##_front_init(struct T##_front_ring *r, void *page, size_t bytes)       \
{ XEN_FRONT_RING_INIT(r, (struct T##_sring *)page, bytes); }                  \
void T##_front_attach(struct T##_front_ring *r, void *page, size_t bytes,     \
                      RING_IDX i)                                             \
{ FRONT_RING_ATTACH(r, (struct T##_sring *)page, i, bytes); }                 \
void T##_back_init(struct T##_back_ring *r, void *page, size_t bytes)         \
{ BACK_RING_INIT(r, (struct T##_sring *)page, bytes); }                       \
void T##_back_attach(struct T##_back_ring *r, void *page, size_t bytes,       \
                     RING_IDX i)                                              \
{ BACK_RING_ATTACH(r, (struct T##_sring *)page, i, bytes); }                  \
unsigned int T##_free_requests(struct T##_front_ring *r)                      \
{ return RING_FREE_REQUESTS(r); }                                             \
int T##_full(struct T##_front_ring *r) { return RING_FULL(r); }               \
unsigned int T##_unconsumed_responses(struct T##_front_ring *r)               \
{ return XEN_RING_NR_UNCONSUMED_RESPONSES(r); }                               \
unsigned int T##_has_unconsumed_responses(struct T##_front_ring *r)           \
{ return RING_HAS_UNCONSUMED_RESPONSES(r); }                                  \
unsigned int T##_unconsumed_requests(struct T##_back_ring *r)                 \
{ return XEN_RING_NR_UNCONSUMED_REQUESTS(r); }                                \
unsigned int T##_has_unconsumed_requests(struct T##_back_ring *r)             \
{ return RING_HAS_UNCONSUMED_REQUESTS(r); }                                   \
int T##_request_cons_overflow(struct T##_back_ring *r, RING_IDX cons)         \
{ return RING_REQUEST_CONS_OVERFLOW(r, cons); }                               \
int T##_request_prod_overflow(struct T##_back_ring *r, RING_IDX prod)         \
{ return RING_REQUEST_PROD_OVERFLOW(r, prod); }                               \
int T##_response_prod_overflow(struct T##_front_ring *r, RING_IDX prod)       \
{ return RING_RESPONSE_PROD_OVERFLOW(r, prod); }                              \
size_t T##_request_offset(struct T##_front_ring *r, RING_IDX idx)             \
{ return (size_t)((uint8_t *)RING_GET_REQUEST(r, idx) - (uint8_t *)r->sring); } \
size_t T##_response_offset(struct T##_back_ring *r, RING_IDX idx)             \
{ return (size_t)((uint8_t *)RING_GET_RESPONSE(r, idx) - (uint8_t *)r->sring); } \
/* Frontend: fill free slots by struct assignment, as drivers do. */         \
unsigned int T##_front_put(struct T##_front_ring *r, const uint8_t *src,      \
                           unsigned int n)                                    \
{                                                                             \
    unsigned int done = 0;                                                    \
    while (done < n && !RING_FULL(r)) {                                       \
        T##_shim_req_t req;                                                   \
        memcpy(&req, src + (size_t)done * sizeof(req), sizeof(req));          \
        *RING_GET_REQUEST(r, r->req_prod_pvt) = req;                          \
        r->req_prod_pvt++;                                                    \
        done++;                                                               \
    }                                                                         \
    return done;                                                              \
}                                                                             \
int T##_front_push_check(struct T##_front_ring *r)                            \
{ int notify; RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(r, notify); return notify; } \
/* Frontend: consume responses (blkfront's loop), -1 on a bogus rsp_prod. */ \
long T##_front_take(struct T##_front_ring *r, uint8_t *dst, unsigned int max) \
{                                                                             \
    RING_IDX i, rp = r->sring->rsp_prod;                                      \
    unsigned int n = 0;                                                       \
    xen_rmb();                                                                \
    if (RING_RESPONSE_PROD_OVERFLOW(r, rp))                                   \
        return -1;                                                            \
    for (i = r->rsp_cons; i != rp && n < max; i++, n++) {                     \
        T##_shim_rsp_t rsp;                                                   \
        RING_COPY_RESPONSE(r, i, &rsp);                                       \
        memcpy(dst + (size_t)n * sizeof(rsp), &rsp, sizeof(rsp));             \
    }                                                                         \
    r->rsp_cons = i;                                                          \
    return n;                                                                 \
}                                                                             \
unsigned int T##_front_final_check(struct T##_front_ring *r)                  \
{ unsigned int work; RING_FINAL_CHECK_FOR_RESPONSES(r, work); return work; }  \
/* Backend: consume requests (blkback's loop), -1 on a bogus req_prod. */    \
long T##_back_take(struct T##_back_ring *r, uint8_t *dst, unsigned int max)   \
{                                                                             \
    RING_IDX rc = r->req_cons, rp = r->sring->req_prod;                       \
    unsigned int n = 0;                                                       \
    xen_rmb();                                                                \
    if (RING_REQUEST_PROD_OVERFLOW(r, rp))                                    \
        return -1;                                                            \
    while (rc != rp && n < max) {                                             \
        T##_shim_req_t req;                                                   \
        if (RING_REQUEST_CONS_OVERFLOW(r, rc))                                \
            break;                                                            \
        RING_COPY_REQUEST(r, rc, &req);                                       \
        memcpy(dst + (size_t)n * sizeof(req), &req, sizeof(req));             \
        r->req_cons = ++rc;                                                   \
        n++;                                                                  \
    }                                                                         \
    return n;                                                                 \
}                                                                             \
/* Backend: queue n responses by struct assignment (no flow control). */     \
void T##_back_put(struct T##_back_ring *r, const uint8_t *src, unsigned int n)\
{                                                                             \
    unsigned int k;                                                           \
    for (k = 0; k < n; k++) {                                                 \
        T##_shim_rsp_t rsp;                                                   \
        memcpy(&rsp, src + (size_t)k * sizeof(rsp), sizeof(rsp));             \
        *RING_GET_RESPONSE(r, r->rsp_prod_pvt) = rsp;                         \
        r->rsp_prod_pvt++;                                                    \
    }                                                                         \
}                                                                             \
int T##_back_push_check(struct T##_back_ring *r)                              \
{ int notify; RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(r, notify); return notify; } \
unsigned int T##_back_final_check(struct T##_back_ring *r)                    \
{ unsigned int work; RING_FINAL_CHECK_FOR_REQUESTS(r, work); return work; }
"""

_RING_CDEF = """
struct {T}_front_ring {{ RING_IDX req_prod_pvt; RING_IDX rsp_cons; unsigned int nr_ents; ...; }};
struct {T}_back_ring {{ RING_IDX rsp_prod_pvt; RING_IDX req_cons; unsigned int nr_ents; ...; }};
size_t {T}_req_size(void);
size_t {T}_rsp_size(void);
size_t {T}_slot_size(void);
size_t {T}_ring_offset(void);
unsigned int {T}_const_ring_size(size_t bytes);
void {T}_shared_ring_init(void *page);
void {T}_front_init(struct {T}_front_ring *r, void *page, size_t bytes);
void {T}_front_attach(struct {T}_front_ring *r, void *page, size_t bytes, RING_IDX i);
void {T}_back_init(struct {T}_back_ring *r, void *page, size_t bytes);
void {T}_back_attach(struct {T}_back_ring *r, void *page, size_t bytes, RING_IDX i);
unsigned int {T}_free_requests(struct {T}_front_ring *r);
int {T}_full(struct {T}_front_ring *r);
unsigned int {T}_unconsumed_responses(struct {T}_front_ring *r);
unsigned int {T}_has_unconsumed_responses(struct {T}_front_ring *r);
unsigned int {T}_unconsumed_requests(struct {T}_back_ring *r);
unsigned int {T}_has_unconsumed_requests(struct {T}_back_ring *r);
int {T}_request_cons_overflow(struct {T}_back_ring *r, RING_IDX cons);
int {T}_request_prod_overflow(struct {T}_back_ring *r, RING_IDX prod);
int {T}_response_prod_overflow(struct {T}_front_ring *r, RING_IDX prod);
size_t {T}_request_offset(struct {T}_front_ring *r, RING_IDX idx);
size_t {T}_response_offset(struct {T}_back_ring *r, RING_IDX idx);
unsigned int {T}_front_put(struct {T}_front_ring *r, const uint8_t *src, unsigned int n);
int {T}_front_push_check(struct {T}_front_ring *r);
long {T}_front_take(struct {T}_front_ring *r, uint8_t *dst, unsigned int max);
unsigned int {T}_front_final_check(struct {T}_front_ring *r);
long {T}_back_take(struct {T}_back_ring *r, uint8_t *dst, unsigned int max);
void {T}_back_put(struct {T}_back_ring *r, const uint8_t *src, unsigned int n);
int {T}_back_push_check(struct {T}_back_ring *r);
unsigned int {T}_back_final_check(struct {T}_back_ring *r);
"""

# --------------------------------------------------------------------------
# Byte rings: flex ring functions (the header's own) and a console end.
# --------------------------------------------------------------------------

_BYTES_C = r"""
unsigned long shim_flex_ring_size(int order) { return XEN_FLEX_RING_SIZE(order); }
uint32_t shim_mask_xencons_in(uint32_t idx)
{ struct xencons_interface *intf = 0; (void)intf; return MASK_XENCONS_IDX(idx, intf->in); }
uint32_t shim_mask_xencons_out(uint32_t idx)
{ struct xencons_interface *intf = 0; (void)intf; return MASK_XENCONS_IDX(idx, intf->out); }

/* Console, as Linux hvc_xen (guest: writes out, reads in) and xenconsoled
 * (backend: writes in, reads out) drive it with MASK_XENCONS_IDX. Returns -1
 * where they refuse a gap prod - cons > sizeof(buffer). */
#define SHIM_CONS_WRITE(dir)                                                   \
long shim_cons_write_##dir(struct xencons_interface *intf, const char *data,   \
                           unsigned int len)                                   \
{                                                                              \
    XENCONS_RING_IDX cons = intf->dir##_cons, prod = intf->dir##_prod;        \
    unsigned int sent = 0;                                                     \
    xen_mb();                                                                  \
    if ((XENCONS_RING_IDX)(prod - cons) > sizeof(intf->dir))                   \
        return -1;                                                             \
    while (sent < len && (XENCONS_RING_IDX)(prod - cons) < sizeof(intf->dir))  \
        intf->dir[MASK_XENCONS_IDX(prod++, intf->dir)] = data[sent++];         \
    xen_wmb();                                                                 \
    intf->dir##_prod = prod;                                                   \
    return sent;                                                               \
}
#define SHIM_CONS_READ(dir)                                                    \
long shim_cons_read_##dir(struct xencons_interface *intf, char *buf,           \
                          unsigned int len)                                    \
{                                                                              \
    XENCONS_RING_IDX cons = intf->dir##_cons, prod = intf->dir##_prod;        \
    unsigned int recv = 0;                                                     \
    xen_mb();                                                                  \
    if ((XENCONS_RING_IDX)(prod - cons) > sizeof(intf->dir))                   \
        return -1;                                                             \
    while (cons != prod && recv < len)                                         \
        buf[recv++] = intf->dir[MASK_XENCONS_IDX(cons++, intf->dir)];          \
    xen_mb();                                                                  \
    intf->dir##_cons = cons;                                                   \
    return recv;                                                               \
}
SHIM_CONS_WRITE(in)
SHIM_CONS_WRITE(out)
SHIM_CONS_READ(in)
SHIM_CONS_READ(out)

int shim_xsd_errors_count(void) { return sizeof(xsd_errors) / sizeof(xsd_errors[0]); }
const char *shim_xsd_error_name(int i) { return xsd_errors[i].errstring; }
int shim_xsd_error_num(int i) { return xsd_errors[i].errnum; }
"""

_BYTES_CDEF = """
RING_IDX test_mask(RING_IDX idx, RING_IDX ring_size);
void test_read_packet(void *opaque, const unsigned char *buf, size_t size,
                      RING_IDX masked_prod, RING_IDX *masked_cons, RING_IDX ring_size);
void test_write_packet(unsigned char *buf, const void *opaque, size_t size,
                       RING_IDX *masked_prod, RING_IDX masked_cons, RING_IDX ring_size);
RING_IDX test_queued(RING_IDX prod, RING_IDX cons, RING_IDX ring_size);
unsigned long shim_flex_ring_size(int order);
uint32_t shim_mask_xencons_in(uint32_t idx);
uint32_t shim_mask_xencons_out(uint32_t idx);
long shim_cons_write_in(void *intf, const char *data, unsigned int len);
long shim_cons_write_out(void *intf, const char *data, unsigned int len);
long shim_cons_read_in(void *intf, char *buf, unsigned int len);
long shim_cons_read_out(void *intf, char *buf, unsigned int len);
int shim_xsd_errors_count(void);
const char *shim_xsd_error_name(int i);
int shim_xsd_error_num(int i);
"""

# Xen structs that Python fills field by field (layout taken from the compiler).
_STRUCTS_CDEF = """
typedef uint32_t grant_ref_t;
struct blkif_request_segment { grant_ref_t gref; uint8_t first_sect; uint8_t last_sect; ...; };
struct blkif_request { uint8_t operation; uint8_t nr_segments; uint16_t handle; uint64_t id;
    uint64_t sector_number; struct blkif_request_segment seg[11]; ...; };
struct blkif_request_discard { uint8_t operation; uint8_t flag; uint16_t handle; uint64_t id;
    uint64_t sector_number; uint64_t nr_sectors; ...; };
struct blkif_request_indirect { uint8_t operation; uint8_t indirect_op; uint16_t nr_segments;
    uint64_t id; uint64_t sector_number; uint16_t handle; grant_ref_t indirect_grefs[8]; ...; };
struct blkif_response { uint64_t id; uint8_t operation; int16_t status; ...; };
struct netif_tx_request { grant_ref_t gref; uint16_t offset; uint16_t flags; uint16_t id;
    uint16_t size; ...; };
struct netif_tx_response { uint16_t id; int16_t status; ...; };
struct netif_rx_request { uint16_t id; uint16_t pad; grant_ref_t gref; ...; };
struct netif_rx_response { uint16_t id; uint16_t offset; uint16_t flags; int16_t status; ...; };
struct grant_entry_v1 { uint16_t flags; uint16_t domid; uint32_t frame; ...; };
struct xsd_sockmsg { uint32_t type; uint32_t req_id; uint32_t tx_id; uint32_t len; ...; };
"""


# --------------------------------------------------------------------------
# Enumerating the headers: members (pycparser) and macros (gcc -dM).
# --------------------------------------------------------------------------

# pycparser needs plain C: the standard types come from these typedefs
# instead of glibc headers (ring.h only asks for them to be declared).
_PYCPARSER_PRELUDE = """
typedef unsigned char uint8_t; typedef signed char int8_t;
typedef unsigned short uint16_t; typedef short int16_t;
typedef unsigned int uint32_t; typedef int int32_t;
typedef unsigned long uint64_t; typedef long int64_t;
typedef unsigned long size_t; typedef unsigned long uintptr_t;
#define __XEN_TOOLS__ 1
""" + "".join(f"#include <{h}>\n" for h in XEN_HEADERS)


def _preprocess(source: str, *args: str) -> str:
    proc = subprocess.run(
        ["gcc", "-E", *args, "-I", str(XEN_INCLUDE_DIR), "-x", "c", "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


@dataclass(frozen=True)
class Member:
    """One member of a Xen struct, named by its ``offsetof`` designator."""

    struct: str  # e.g. "netif_extra_info"
    designator: str  # e.g. "u.gso.size"
    parent: str  # designator of the enclosing anonymous aggregate, "" at top level
    flexible: bool  # a flexible array member (no sizeof)


def _enumerate_members(ast: c_ast.FileAST) -> dict[str, list[Member]]:
    """Members (recursing into anonymous struct/union types) of XEN_STRUCTS."""
    defs = {}
    for node in ast.ext:
        t = node.type if isinstance(node, c_ast.Decl) else None
        if isinstance(t, c_ast.Struct) and t.decls is not None:
            defs[t.name] = t

    def walk(struct_name, aggregate, prefix, out):
        for decl in aggregate.decls:
            designator = f"{prefix}.{decl.name}" if prefix else decl.name
            flexible = isinstance(decl.type, c_ast.ArrayDecl) and decl.type.dim is None
            out.append(Member(struct_name, designator, prefix, flexible))
            inner = decl.type.type if isinstance(decl.type, c_ast.TypeDecl) else None
            if isinstance(inner, (c_ast.Struct, c_ast.Union)) and inner.decls is not None:
                walk(struct_name, inner, designator, out)

    members = {}
    for name in XEN_STRUCTS:
        out: list[Member] = []
        walk(name, defs[name], "", out)
        members[name] = out
    return members


def _enumerators(ast: c_ast.FileAST) -> list[str]:
    names = []

    class V(c_ast.NodeVisitor):
        def visit_Enumerator(self, node):
            names.append(node.name)

    V().visit(ast)
    return names


def _integer_macros(prelude: str) -> list[str]:
    names = []
    for line in _preprocess(prelude, "-dM").splitlines():
        m = re.match(r"#define ([A-Za-z_][A-Za-z0-9_]*) (.*)$", line)
        if m and _MACRO_RE.match(m.group(1)) and '"' not in m.group(2) and m.group(2):
            names.append(m.group(1))
    return sorted(names)


# --------------------------------------------------------------------------
# pvio's generated structs: every top-level field and union member.
# --------------------------------------------------------------------------


def union_members(name: str, field: str) -> list:
    """The member constructs of the union field ``field`` of pvio layout ``name``."""
    con = next(s for s in layouts.LAYOUTS[name].subcons if s.name == field)
    while isinstance(con, c.Renamed):
        con = con.subcon
    con = con.subcon  # pvio.layouts.union(): Padded(size, Union(...))
    while isinstance(con, c.Renamed):
        con = con.subcon
    assert isinstance(con, c.Union), con
    return list(con.subcons)


def pvio_designators(name: str) -> list[tuple[str, str]]:
    """(designator, parent) for each field and union member of ``struct pvio_<name>``."""
    out = []
    for f in _cgen.fields(layouts.LAYOUTS[name]):
        out.append((f.name, ""))
        if f.ctype == "union":
            out.extend((f"{f.name}.{m.name}", f.name) for m in union_members(name, f.name))
    return out


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


@dataclass(repr=False)
class XenC:
    """The compiled shim plus the tables it was generated from."""

    ffi: object
    lib: object
    members: dict[str, list[Member]]  # Xen struct -> members
    member_offset: dict[tuple[str, str], int]
    member_size: dict[tuple[str, str], int | None]  # None for a flexible array
    struct_size: dict[str, int]
    pvio_offset: dict[tuple[str, str], int]  # (layout, designator) in struct pvio_*
    pvio_size: dict[tuple[str, str], int]
    pvio_struct_size: dict[str, int]
    constants: dict[str, int]  # every Xen macro/enumerator of interest + SHIM_*
    xsd_errors: list[tuple[str, int]]

    def __repr__(self) -> str:
        return f"<XenC {self.lib!r}>"

    def ring(self, t: str, fn: str):
        """The C function ``<t>_<fn>`` of ring type ``t``."""
        return getattr(self.lib, f"{t}_{fn}")


def _source_and_tables():
    custom_parse = _PYCPARSER_PRELUDE + CUSTOM_TYPES
    ast = CParser().parse(_preprocess(custom_parse, "-P", "-nostdinc"), "<xen headers>")
    members = _enumerate_members(ast)
    constants = sorted(
        set(_integer_macros(PRELUDE + CUSTOM_TYPES)) | set(_enumerators(ast))
    ) + sorted(DERIVED_CONSTANTS)

    def size_expr(struct, m: Member):
        if m.flexible:
            return "0"
        return f"sizeof(((struct {struct} *)0)->{m.designator})"

    member_rows = [(s, m) for s in XEN_STRUCTS for m in members[s]]
    pvio_rows = [(n, d) for n in layouts.LAYOUTS for d, _ in pvio_designators(n)]

    parts = [PRELUDE, CUSTOM_TYPES, _cgen.c_declarations(), _RING_C]
    parts += [f"SHIM_RING({t})\n" for t in RING_TYPES]
    parts.append(_BYTES_C)
    parts.append(
        "static const size_t shim_member_offsets[] = {\n"
        + "".join(f"    offsetof(struct {s}, {m.designator}),\n" for s, m in member_rows)
        + "};\nstatic const size_t shim_member_sizes[] = {\n"
        + "".join(f"    {size_expr(s, m)},\n" for s, m in member_rows)
        + "};\nstatic const size_t shim_struct_sizes[] = {\n"
        + "".join(f"    sizeof(struct {s}),\n" for s in XEN_STRUCTS)
        + "};\nstatic const size_t shim_pvio_offsets[] = {\n"
        + "".join(f"    offsetof(struct pvio_{n}, {d}),\n" for n, d in pvio_rows)
        + "};\nstatic const size_t shim_pvio_sizes[] = {\n"
        + "".join(f"    sizeof(((struct pvio_{n} *)0)->{d}),\n" for n, d in pvio_rows)
        + "};\nstatic const size_t shim_pvio_struct_sizes[] = {\n"
        + "".join(f"    sizeof(struct pvio_{n}),\n" for n in layouts.LAYOUTS)
        + "};\nstatic const long long shim_constants[] = {\n"
        + "".join(
            f"    (long long)({DERIVED_CONSTANTS.get(k, k)}),\n" for k in constants
        )
        + "};\n"
        + "size_t shim_member_offset(int i) { return shim_member_offsets[i]; }\n"
        + "size_t shim_member_size(int i) { return shim_member_sizes[i]; }\n"
        + "size_t shim_struct_size(int i) { return shim_struct_sizes[i]; }\n"
        + "size_t shim_pvio_offset(int i) { return shim_pvio_offsets[i]; }\n"
        + "size_t shim_pvio_size(int i) { return shim_pvio_sizes[i]; }\n"
        + "size_t shim_pvio_struct_size(int i) { return shim_pvio_struct_sizes[i]; }\n"
        + "long long shim_constant(int i) { return shim_constants[i]; }\n"
    )
    source = "\n".join(parts)

    cdef = "typedef unsigned int RING_IDX;\n" + _STRUCTS_CDEF
    cdef += "".join(_RING_CDEF.format(T=t) for t in RING_TYPES)
    cdef += _BYTES_CDEF
    cdef += """
size_t shim_member_offset(int i);
size_t shim_member_size(int i);
size_t shim_struct_size(int i);
size_t shim_pvio_offset(int i);
size_t shim_pvio_size(int i);
size_t shim_pvio_struct_size(int i);
long long shim_constant(int i);
"""
    return source, cdef, members, member_rows, pvio_rows, constants


def build(cache_dir: Path) -> XenC:
    """Compile (or reuse from ``cache_dir``) the shim and read its tables."""
    source, cdef, members, member_rows, pvio_rows, constants = _source_and_tables()
    digest = hashlib.sha256((source + "\0" + cdef).encode()).hexdigest()[:16]
    modname = f"_pvio_xen_shim_{digest}"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{modname}.so"
    if not target.exists():
        ffi = FFI()
        ffi.cdef(cdef)
        ffi.set_source(
            modname,
            source,
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function",
                                "-Werror=implicit-function-declaration"],
        )
        # Compile privately, then publish atomically (parallel sessions).
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            os.replace(ffi.compile(tmpdir=tmp, verbose=False), target)
        for stale in cache_dir.glob("_pvio_xen_shim_*.so"):
            if stale != target:
                stale.unlink(missing_ok=True)
    spec = importlib.util.spec_from_file_location(modname, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[modname] = module
    ffi, lib = module.ffi, module.lib

    member_offset, member_size = {}, {}
    for i, (s, m) in enumerate(member_rows):
        member_offset[s, m.designator] = lib.shim_member_offset(i)
        member_size[s, m.designator] = None if m.flexible else lib.shim_member_size(i)
    pvio_offset, pvio_size = {}, {}
    for i, key in enumerate(pvio_rows):
        pvio_offset[key] = lib.shim_pvio_offset(i)
        pvio_size[key] = lib.shim_pvio_size(i)
    return XenC(
        ffi=ffi,
        lib=lib,
        members=members,
        member_offset=member_offset,
        member_size=member_size,
        struct_size={s: lib.shim_struct_size(i) for i, s in enumerate(XEN_STRUCTS)},
        pvio_offset=pvio_offset,
        pvio_size=pvio_size,
        pvio_struct_size={
            n: lib.shim_pvio_struct_size(i) for i, n in enumerate(layouts.LAYOUTS)
        },
        constants={k: lib.shim_constant(i) for i, k in enumerate(constants)},
        xsd_errors=[
            (ffi.string(lib.shim_xsd_error_name(i)).decode(), lib.shim_xsd_error_num(i))
            for i in range(lib.shim_xsd_errors_count())
        ],
    )
