"""``vdisk info``: facts about an image (and its backing chain)."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from ..errors import BackingError
from .options import (force_share_option, format_option, open_image, output_option, unsafe_backing_option)
from .output import emit_json, one_line


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("--backing-chain", is_flag=True, help="Describe every image of the backing chain, top first.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
def info(fmt, output, backing_chain, unsafe_backing, force_share, filename):
    """Show facts about an image.

    --output json prints what qemu-img info --output json prints, with the same
    keys, so that tools written for qemu-img read it: an object, or with
    --backing-chain a list of them, top image first.  Keys qemu-img prints have
    qemu-img's names and meaning; vdisk's own keys start with "vdisk-".  Every
    key is always present, for every format (raw, vdk, qcow2): where qemu-img
    leaves a key out, vdisk prints null.  Bytes of a file name that are not UTF-8
    print as U+FFFD, as qemu-img prints them.

    \b
    JSON keys (qemu-img's):
      virtual-size, filename, format,
      actual-size (host bytes the file occupies), cluster-size,
      dirty-flag (qcow2's dirty bit; false for formats without one),
      backing-filename (as the image names it), full-backing-filename (the
        file opened: that name in the overlay's directory, as qemu-img
        prints it; null if not opened), backing-filename-format,
      snapshots: [{id (a string), name, vm-state-size, date-sec, date-nsec,
        vm-clock-sec, vm-clock-nsec, icount (0 where vdisk keeps no VM state),
        vdisk-size (guest bytes), vdisk-generation, vdisk-unique-bytes (host
        bytes only this snapshot holds, or null), vdisk-holds (linked clones
        depending on it), vdisk-holders ([{image-id, path}])}],
      format-specific: {type: FORMAT, data: {...}} (qcow2: qemu-img's keys
        compat, compression-type, lazy-refcounts, refcount-bits, corrupt,
        extended-l2, then vdisk-* ones; vdk: its own keys, no prefix)
    JSON keys (vdisk's):
      vdisk-compression (of new writes; null if off), vdisk-read-only,
      vdisk-backing-snapshot (vdk clones: "#ID"), vdisk-backing-snapshot-name,
      vdisk-space (vdk: {live-referenced-bytes, live-unique-bytes,
        snapshots: [{name, id, referenced-bytes, unique-bytes}],
        hidden-snapshots-bytes}; else null)
    """
    from ..ops.mapping import chain_info, chain_to_json, image_info, info_to_json, render_info_human

    try:
        img = open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share)
    except BackingError as exc:
        if backing_chain:
            raise
        # The image itself is fine: describe it without its (unreachable) backing chain.
        click.echo(f"vdisk: warning: {one_line(exc.message)}", err=True)
        img = open_image(filename, fmt=fmt, backing=False, force_share=force_share)
    with img:
        infos = chain_info(img) if backing_chain else [image_info(img)]
    if output == "json":
        emit_json(chain_to_json(infos) if backing_chain else info_to_json(infos[0]))
    else:
        click.echo("\n\n".join(render_info_human(i) for i in infos))
