"""Workloads that tests and demos both run (the demos in scripts/ show what the tests assert).

One module per area; each workload is a plain function of paths and counts, meant to run in a
child process with a deadline (harness.mount.run_in_child / Mount.run), returning counts.
  kernel_cache    O_DIRECT reads into a mapping of the same file (issue 12 hangs, race 19)
  mapping         O_DIRECT read into a mapping vs a direct write (--bug reply-in-loop)
  mmap_self       mmap + O_DIRECT self-I/O under a locked shootdown (--bug no-fault-marker)
  fill_race       a buffered fill vs a direct write of its readahead (--bug no-pagecache-lock)
  holes           writes into holes and past EOF vs concurrent readers, over a deleted
                  file's blocks (--bug size-before-data)
  holes_power_cut the same writes on the crash backend, every cut image read off-line
"""
