"""Crash-consistency and fault-injection harness for vdisk (see RELIABILITY.md).

- :mod:`.storage`   in-memory host storage that records every operation
                    (``RecordingStorage``), rebuilds the storage as a power cut could
                    leave it (``crash_states``), and fails chosen calls (``FaultyStorage``).
- :mod:`.workload`  deterministic workloads against the vdk driver together with a
                    model of the guest-visible state at every operation boundary, and
                    the checker that decides whether a recovered image is acceptable.
- :mod:`.figures`   where the runs record their figures (crash states, injection
                    points, ...) so that RELIABILITY.md's numbers are reproducible.
"""
