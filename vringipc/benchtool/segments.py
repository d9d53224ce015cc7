"""vringipc segments on this machine: ``vringipc ls``, ``inspect NAME``, ``gc``.

Named (``backend="shm"``) segments live in /dev/shm as ``vr_<creator pid
hex>_<12 hex>`` (vringipc.segment.make_name).  For each one we read:

* the creator pid from the name, and whether it still runs;
* the header (vringipc.layout.parse_header): size, app kind (raw ring,
  channel, queue), rings, arena, creation time;
* the liveness blocks at layout.DRIVER_LIVENESS_OFF / DEVICE_LIVENESS_OFF
  (pid, start time, state) read with atomic loads (SharedWords), and whether
  each recorded process still runs (vringipc.peers.alive, which also checks
  the start time so a recycled pid is not taken for the original);
* for a queue, its process table (every process that has used it);
* ring state: avail idx, used idx, messages in flight;
* which processes map the segment now (/proc/*/maps, best effort).

``gc`` removes a segment when its creator is dead and no live process is
attached to it (no live liveness block, no live queue user, no mapping in
/proc).  Segments without a creator pid in their name are never removed.
"""

from __future__ import annotations

import datetime
import mmap
import os
import struct

from vringipc import layout as L
from vringipc import peers
from vringipc.segment import NAME_PREFIX, SHM_DIR, name_pid

__all__ = ["list_names", "inspect", "scan", "gc", "ls_table", "ls_rows", "LS_COLUMNS", "inspect_text", "APP_KINDS"]

APP_KINDS = {L.APP_RAW: "raw ring", L.APP_CHANNEL: "channel", L.APP_QUEUE: "queue"}
_STATES = {L.PEER_DETACHED: "detached", L.PEER_ATTACHED: "attached", L.PEER_CLOSED: "closed"}

# The queue layer's process table (vringipc/queue.py): u32 pid, u32 flags, u64 start time.
_QUEUE_PEERS_OFF = 0x500
_QUEUE_PEER_ENTRY = 16


def list_names(shm_dir: str = SHM_DIR) -> list[str]:
    """Names ('/vr_...') of the vringipc entries in /dev/shm."""
    try:
        return sorted("/" + n for n in os.listdir(shm_dir) if ("/" + n).startswith(NAME_PREFIX))
    except FileNotFoundError:
        return []


def _mappers(paths: set[str]) -> dict[str, list[int]]:
    """{path: [pids mapping it]} from /proc/*/maps (processes we may read)."""
    out: dict[str, list[int]] = {p: [] for p in paths}
    if not paths:
        return out
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for p in paths:
            if p.encode() in data:
                out[p].append(int(d))
    return out


class _Words:
    """Atomic loads through SharedWords when the segment could be mapped
    writable (as vringipc itself does), else plain reads of a read-only map."""

    def __init__(self, m, writable: bool):
        self.m = m
        self.sw = None
        if writable:
            from vringipc._ring import SharedWords
            self.sw = SharedWords(m)

    def load32(self, off: int) -> int:
        if self.sw is not None:
            return self.sw.load32(off)
        return struct.unpack_from("<I", self.m, off)[0]

    def load64(self, off: int) -> int:
        if self.sw is not None:
            return self.sw.load64(off)
        return struct.unpack_from("<Q", self.m, off)[0]

    def close(self):
        if self.sw is not None:
            self.sw.close()
            self.sw = None


def _peer(words, off: int) -> dict:
    pid, start, state = peers.read_peer(words, off)
    return {"pid": pid or None, "start_time": start, "epoch": words.load32(off + L.PEER_EPOCH),
            "state": _STATES.get(state, f"unknown({state})"),
            "alive": bool(pid) and peers.alive(pid, start)}


def inspect(name: str, shm_dir: str = SHM_DIR, mappers: dict | None = None) -> dict:
    """Everything we can tell about one segment (never modifies it)."""
    if not name.startswith("/"):
        name = "/" + name
    path = os.path.join(shm_dir, name[1:])
    st = os.stat(path)
    cpid = name_pid(name)
    info = {
        "name": name, "path": path, "size": st.st_size, "uid": st.st_uid,
        "mode": oct(st.st_mode & 0o777),
        "mtime": datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
        "creator_pid": cpid,
        "creator_alive": (peers.alive(cpid) if cpid else None),
        "valid": False, "error": None,
        "app_kind": None, "features": None, "nrings": None, "rings": [],
        "arena_size": None, "max_msg": None, "created": None,
        "driver": None, "device": None, "queue_users": None,
        "mapped_by": None,
    }
    if mappers is None:
        mappers = _mappers({path})
    info["mapped_by"] = sorted(mappers.get(path, []))
    if st.st_size < L.HDR_SIZE:
        info["error"] = f"{st.st_size} bytes: smaller than a vringipc header"
        return info
    writable = True
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        writable = False
        fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED,
                      mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)
    words = None
    try:
        try:
            lay = L.parse_header(m)
        except L.LayoutError as e:
            info["error"] = f"not a valid vringipc header: {e}"
            return info
        info["valid"] = True
        info["app_kind"] = APP_KINDS.get(lay.app_kind, f"unknown({lay.app_kind})")
        info["features"] = [n for n, bit in (("INDIRECT_DESC", L.F_INDIRECT_DESC),
                                             ("EVENT_IDX", L.F_EVENT_IDX),
                                             ("VERSION_1", L.F_VERSION_1)) if lay.features & bit]
        info["nrings"] = len(lay.rings)
        info["arena_size"] = lay.arena_size
        info["max_msg"] = lay.max_msg
        if lay.create_time_ns:
            info["created"] = datetime.datetime.fromtimestamp(
                lay.create_time_ns / 1e9).isoformat(timespec="seconds")
        words = _Words(m, writable)
        info["status"] = words.load32(L.OFF_STATUS)
        for r in lay.rings:
            avail = words.load32(r.avail_off) >> 16          # u16 flags | u16 idx
            used = words.load32(r.used_off) >> 16
            info["rings"].append({"num": r.num, "window": r.win_size, "avail_idx": avail,
                                  "used_idx": used, "in_flight": (avail - used) & 0xFFFF})
        info["driver"] = _peer(words, L.DRIVER_LIVENESS_OFF)
        info["device"] = _peer(words, L.DEVICE_LIVENESS_OFF)
        if lay.app_kind == L.APP_QUEUE:
            users = []
            for i in range((L.HDR_SIZE - _QUEUE_PEERS_OFF) // _QUEUE_PEER_ENTRY):
                off = _QUEUE_PEERS_OFF + i * _QUEUE_PEER_ENTRY
                pid = words.load32(off)
                if pid:
                    users.append({"pid": pid, "alive": peers.alive(pid, words.load64(off + 8))})
            info["queue_users"] = users
    finally:
        if words is not None:
            words.close()
        m.close()
    return info


def _live_users(info: dict) -> list[int]:
    pids = set()
    for side in ("driver", "device"):
        p = info.get(side)
        if p and p["alive"] and p["state"] == "attached":
            pids.add(p["pid"])
    for u in info.get("queue_users") or []:
        if u["alive"]:
            pids.add(u["pid"])
    pids.update(info.get("mapped_by") or [])
    return sorted(pids)


def scan(shm_dir: str = SHM_DIR, names=None) -> list[dict]:
    """inspect() every vringipc segment (or the given names)."""
    names = list(names) if names else list_names(shm_dir)
    names = ["/" + n.lstrip("/") for n in names]
    maps = _mappers({os.path.join(shm_dir, n[1:]) for n in names})
    out = []
    for n in names:
        try:
            info = inspect(n, shm_dir, maps)
        except FileNotFoundError:
            continue                      # removed meanwhile
        except OSError as e:
            info = {"name": n, "error": str(e), "creator_pid": name_pid(n), "valid": False,
                    "creator_alive": peers.alive(name_pid(n)) if name_pid(n) else None}
        info["live_users"] = _live_users(info)
        out.append(info)
    return out


def gc_verdict(info: dict) -> tuple[bool, str]:
    """(remove?, why) for one scanned segment."""
    cpid = info.get("creator_pid")
    if cpid is None:
        return False, "keep: no creator pid in the name"
    if info.get("creator_alive"):
        return False, f"keep: creator {cpid} is alive"
    live = info.get("live_users") or []
    if live:
        return False, f"keep: creator {cpid} is dead but pid(s) {', '.join(map(str, live))} use it"
    return True, f"remove: creator {cpid} is dead and no live process is attached"


def gc(dry_run: bool = False, shm_dir: str = SHM_DIR, names=None) -> list[dict]:
    """Remove the segments whose creator is dead and that no live process
    uses; returns [{"name", "removed", "reason"}] for every segment looked at."""
    out = []
    for info in scan(shm_dir, names):
        remove, why = gc_verdict(info)
        done = False
        if remove and not dry_run:
            try:
                os.unlink(os.path.join(shm_dir, info["name"][1:]))
                done = True
            except FileNotFoundError:
                done = True
            except OSError as e:
                why += f" (unlink failed: {e})"
        out.append({"name": info["name"], "size": info.get("size"), "remove": remove,
                    "removed": done, "reason": why})
    return out


# --- text ------------------------------------------------------------------------------------

def _sz(n) -> str:
    if n is None:
        return "-"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _who(p) -> str:
    if not p or not p.get("pid"):
        return "-"
    return f"{p['pid']}{'' if p['alive'] else ' dead'}{'' if p['state'] == 'attached' else ' ' + p['state']}"


LS_COLUMNS = ("name", "size", "kind", "creator", "producer", "consumer", "queue users",
              "avail/used", "created")
_LS_RIGHT = {"size", "avail/used"}


def ls_rows(infos: list[dict]) -> list[dict]:
    """One dict per segment, keyed by LS_COLUMNS (the cells of `vringipc ls`).
    A queue has many users rather than one producer and one consumer: its
    live users go under "queue users"; a channel's producer and consumer under
    theirs.  An invalid segment has kind "?" and an extra "error" cell, printed
    after the columns."""
    rows = []
    for i in infos:
        c = i.get("creator_pid")
        row = dict.fromkeys(LS_COLUMNS, "-")
        row.update(name=i["name"], size=_sz(i.get("size")),
                   creator="-" if c is None else f"{c}{'' if i.get('creator_alive') else ' dead'}")
        if i.get("valid"):
            r = i["rings"][0] if i["rings"] else None
            row["avail/used"] = f"{r['avail_idx']}/{r['used_idx']}" if r else "-"
            row["kind"] = i["app_kind"]
            row["created"] = i.get("created") or "-"
            if i.get("queue_users") is not None:
                users = i["queue_users"]
                live = sum(1 for u in users if u["alive"])
                row["queue users"] = f"{live} live of {len(users)}"
            else:
                row["producer"], row["consumer"] = _who(i["driver"]), _who(i["device"])
        else:
            row["kind"] = "?"
            row["error"] = str(i.get("error"))
        rows.append(row)
    return rows


def ls_table(infos: list[dict]) -> str:
    """`vringipc ls`: one line per segment, every column as wide as its
    widest cell, so no cell runs into the next column."""
    if not infos:
        return f"no vringipc segments in {SHM_DIR}"
    rows = ls_rows(infos)
    width = {k: max([len(k)] + [len(r[k]) for r in rows]) for k in LS_COLUMNS}

    def line(cells: dict) -> str:
        return "  ".join(cells[k].rjust(width[k]) if k in _LS_RIGHT else cells[k].ljust(width[k])
                         for k in LS_COLUMNS).rstrip()
    head = line({k: k for k in LS_COLUMNS})
    body = [line(r) + (f"  ({r['error']})" if "error" in r else "") for r in rows]
    return "\n".join([head, "-" * len(head)] + body)


def inspect_text(i: dict) -> str:
    lines = [f"{i['name']}  ({i['path']})",
             f"  size {i['size']} bytes, mode {i['mode']}, uid {i['uid']}, modified {i['mtime']}",
             f"  creator pid {i['creator_pid'] if i['creator_pid'] is not None else '?'}"
             + ("" if i["creator_pid"] is None else (" (alive)" if i["creator_alive"] else " (dead)"))]
    if not i["valid"]:
        lines.append(f"  {i['error']}")
    else:
        lines += [f"  kind {i['app_kind']}, features {'|'.join(i['features'])}, status {i['status']:#x}",
                  f"  arena {i['arena_size']} bytes, largest message {i['max_msg']} bytes, "
                  f"created {i['created'] or '?'}"]
        for k, r in enumerate(i["rings"]):
            lines.append(f"  ring {k}: num {r['num']}, window {r['window']} bytes, avail idx "
                         f"{r['avail_idx']}, used idx {r['used_idx']}, in flight {r['in_flight']}")
        for side, label in (("driver", "producer (driver)"), ("device", "consumer (device)")):
            p = i[side]
            if p["pid"]:
                lines.append(f"  {label}: pid {p['pid']} {'alive' if p['alive'] else 'dead'}, "
                             f"state {p['state']}, epoch {p['epoch']}")
            else:
                lines.append(f"  {label}: none")
        if i["queue_users"] is not None:
            us = ", ".join(f"{u['pid']}{'' if u['alive'] else ' (dead)'}" for u in i["queue_users"])
            lines.append(f"  queue users: {us or 'none'}")
    lines.append(f"  mapped by: {', '.join(map(str, i['mapped_by'])) or 'no other process'}")
    if "live_users" in i:
        lines.append(f"  live users: {', '.join(map(str, i['live_users'])) or 'none'}")
    return "\n".join(lines)
