"""NBD export of vdisk images (``vdisk serve --nbd``), on top of the Image API like
QEMU's ``block/export/`` and ``qemu-nbd``, never knowing a format.

- :mod:`vdisk.export.nbd.proto`: the protocol as pure encode/decode (the handshake
  state machine, request checks, reply encoders, limits); no I/O;
- :mod:`vdisk.export.nbd.server`: the server (a thread per connection, one shared
  Image behind one lock; the concurrency rules are in its docstring).
"""
