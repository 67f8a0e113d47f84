"""VHD resize, the parent reference (``set_backing``, ``verify_backing``) and
``make_empty``.  A mixin of :class:`vdisk.drivers.vhd.VhdDriver`."""

from __future__ import annotations

import os

from ... import budget
from ...codec import vhd as C
from ...errors import BackingError, CorruptImage, NotSupported, UsageError
from ..base import BackingRef
from .layout import ALIGN, MAX_SIZE, footer_for


class ResizeMixin:
    def verify_backing(self, backing) -> None:
        """The parent must be the disk this one was made on: its footer's unique id is
        the one the dynamic header recorded (an all-zero id, as some tools write, is
        not checked)."""
        want = self.dyn.parent_unique_id if self.dyn is not None else bytes(16)
        got = getattr(getattr(backing, "footer", None), "unique_id", None)
        if want != bytes(16) and got is not None and got != want:
            raise BackingError(f"{self.host.name}: its parent {self.backing_ref.filename} is not the disk it was "
                               f"made on (unique id {got.hex()}, the child records {want.hex()})")

    def set_backing(self, ref) -> None:
        """No parent: a differencing disk becomes a dynamic one (the footers first: a
        crash before the header is rewritten leaves a dynamic disk whose header still
        has unused locators).  A new parent (a VHD) replaces the relative locator's
        path where it fits in the locator's space."""
        if ref is None:
            if not self.differencing:
                return
            self.flush()
            footer = self.footer.replace(disk_type=C.TYPE_DYNAMIC)
            self.host.pwrite(0, C.encode_footer(footer))
            self.host.pwrite(self.footer_pos, C.encode_footer(footer))
            self.host.flush()
            dyn = self.dyn.replace(parent_unique_id=bytes(16), parent_timestamp=0, parent_name="",
                                   locators=(C.NO_LOCATOR,) * C.LOCATORS)
            self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
            self.host.flush()
            self.footer, self.dyn, self.backing_ref = footer, dyn, None
            return
        if ref.format != "vpc" or not self.differencing:
            raise NotSupported(f"vpc: a VHD's parent must be a VHD, named when it is created (not {ref.format}"
                               f"{'' if self.differencing else ' for a disk that is not a differencing one'})")
        rel = ref.filename.replace("/", "\\")
        data = C.encode_locator_path(C.PLAT_W2RU, rel if rel.startswith(("\\", ".")) else ".\\" + rel)
        for i, loc in enumerate(self.dyn.locators):
            if loc.platform_code == C.PLAT_W2RU and len(data) <= -(-loc.data_length // C.SECTOR) * C.SECTOR:
                break
        else:
            raise NotSupported("vpc: the differencing disk has no room for that parent's path")
        parent = os.path.join(os.path.dirname(os.path.abspath(self.host.name)), ref.filename)
        try:
            with open(parent, "rb") as f:
                head = f.read(512)
                f.seek(max(0, os.fstat(f.fileno()).st_size - 512))
                tail = f.read(512)
            pf = C.decode_footer(head if head[:8] == C.FOOTER_COOKIE else tail)
        except (OSError, CorruptImage) as exc:
            raise UsageError(f"vpc: cannot read the new parent {parent}: {exc}") from None
        self.flush()
        space = -(-loc.data_length // C.SECTOR) * C.SECTOR
        self.host.pwrite(loc.data_offset, data.ljust(space, b"\0"))
        locs = list(self.dyn.locators)
        locs[i] = C.Locator(C.PLAT_W2RU, loc.data_space, len(data), loc.data_offset)
        locs = [x if j == i or x.platform_code == C.PLAT_NONE else C.NO_LOCATOR for j, x in enumerate(locs)]
        dyn = self.dyn.replace(parent_unique_id=pf.unique_id, parent_timestamp=pf.timestamp,
                               parent_name=os.path.basename(ref.filename)[:256], locators=tuple(locs))
        self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
        self.host.flush()
        self.dyn = dyn
        self.backing_ref = BackingRef(ref.filename, "vpc")

    def _restore_end(self) -> None:
        """After an interrupted write: cut what follows the last block, put the footer back."""
        self.host.truncate(self.footer_pos)
        self.host.pwrite(self.footer_pos, C.encode_footer(self.footer))
        self.host.flush()

    # ------------------------------------------------------------------ resize
    def resize(self, new_size: int) -> None:
        new_size = -(-new_size // C.SECTOR) * C.SECTOR
        if new_size > MAX_SIZE:
            raise UsageError(f"vpc: {new_size} bytes is more than a VHD holds (2040 GiB)")
        old = self.size
        if not self.dynamic:
            footer = footer_for(new_size, C.TYPE_FIXED, C.NO_DATA_OFFSET, self.footer.unique_id)
            footer = footer.replace(creator_app=self.footer.creator_app if self.footer.sized_by_current_size
                                    else C.CREATOR_APP, original_size=self.footer.original_size)
            self.host.pwrite(new_size, C.encode_footer(footer))
            self.host.flush()
            if new_size > old:
                self.host.punch_hole(old, min(512, new_size - old))
            self.host.truncate(new_size + 512)
            self.host.flush()
            self.footer, self.size, self.footer_pos = footer, new_size, new_size
            return
        self.flush()
        bs = self.cluster_size
        need = -(-new_size // bs)
        n = len(self.bat)
        # zeros beyond the old end, or beyond the new one: the tail of the partial block
        cut = min(old, new_size)
        b = cut // bs
        if cut % bs and b < n and self.bat[b] != C.BAT_UNUSED:
            self.write_zeroes(cut, bs - cut % bs)
        for i in range(need, n):
            if self.bat[i] != C.BAT_UNUSED:
                self.host.punch_hole(self.bat[i] * C.SECTOR, self.stride)
                self.bat[i] = C.BAT_UNUSED
        self.flush()
        dyn = self.dyn
        if need > n:
            budget.charge(5 * (need - n), f"{self.host.name}: the BAT")
            self.bat.extend([C.BAT_UNUSED] * (need - n))
            self.state.extend(bytes(need - n))
            if dyn.table_offset + C.bat_bytes(need) > self._bat_room_end():
                dyn = self._move_bat(need)
        else:
            del self.bat[need:]
            del self.state[need:]
        self._write_bat_entries(range(len(self.bat)), dyn.table_offset)
        self.host.pwrite(dyn.table_offset + 4 * len(self.bat),
                         b"\xff" * (C.bat_bytes(len(self.bat)) - 4 * len(self.bat)))
        dyn = dyn.replace(max_table_entries=need)
        footer = footer_for(new_size, self.footer.disk_type, self.footer.data_offset, self.footer.unique_id)
        footer = footer.replace(original_size=self.footer.original_size)
        self.host.flush()
        self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
        self.host.pwrite(0, C.encode_footer(footer))
        self.host.pwrite(self.footer_pos, C.encode_footer(footer))
        self.host.flush()
        self.dyn, self.footer, self.size = dyn, footer, new_size
        self.meta = [(o, ln) for o, ln in self.meta[:2]] + [(dyn.table_offset, 4 * need)] + self.meta[3:]
        if self.differencing and self.backing is not None and new_size > old and self.backing.size > old:
            self.write_zeroes(old, min(new_size, self.backing.size) - old)  # grown space: zeros, not the parent's
            self.flush()

    def _bat_room_end(self) -> int:
        t = self.dyn.table_offset
        starts = [e * C.SECTOR for e in self.bat if e != C.BAT_UNUSED]
        starts += [o for o, _ in self.meta if o > t] + [self.footer_pos]
        return min(s for s in starts if s > t)

    def _move_bat(self, need: int) -> C.DynHeader:
        """Put a BAT of ``need`` entries at the end of the file (its old place is left unused)."""
        p = -(-self.footer_pos // ALIGN) * ALIGN
        room = -(-(C.bat_bytes(need)) // ALIGN) * ALIGN
        self.host.pwrite(p, b"\xff" * room)
        self.footer_pos = p + room
        return self.dyn.replace(table_offset=p)
