#!/usr/bin/env python3
"""`python mount.py IMAGE MOUNTPOINT ...` from a checkout: same as mount.diofs."""

from diofs.cli.mount import main

if __name__ == "__main__":
    main()
