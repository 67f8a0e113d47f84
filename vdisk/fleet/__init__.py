"""The fleet simulator (``vdisk fleet``): many VMs' disks forked from one golden
image, driven concurrently through the Python API by recorded or synthetic
workloads and timed events, measured, and checked at the end against an in-memory
model of every byte each VM wrote.

One concern per module:

- :mod:`.spec`       the TOML spec file (formats/fleet.md): parsing and validation
- :mod:`.traces`     request traces: vdisk's own (formats/trace.md), MSR Cambridge CSV,
                     and fio's iolog v2 (written, for the qemu-storage-daemon comparison)
- :mod:`.model`      what every disk must hold: tokens per 4 KiB block, the golden image
- :mod:`.workloads`  generators of requests (replay, random mix, log append, idle
                     bursts, OS upgrade)
- :mod:`.disks`      forking the golden image and opening a VM's disks per fork method
- :mod:`.events`     checkpoint, restore, live clone, delete, migrate
- :mod:`.runner`     the VM threads, phases, and the final model check
- :mod:`.stats`      latency and throughput accounting
- :mod:`.report`     the human table, JSON, and the HTML page with SVG plots

Data flows down only: this package imports vdisk's API; nothing in vdisk imports it
except the CLI command module (:mod:`vdisk.cli.fleet`).
"""
