"""virtshift: live disk snapshots and storage migration for QEMU, libvirt-compatible.

The package is layered (see docs/ARCHITECTURE.md): ``model`` and ``xml`` hold pure
data and its libvirt XML form; ``qmp`` speaks to QEMU; ``runtime`` owns processes,
files and locks; ``libvirt`` is the libvirt-python look-alike facade and ``cli`` the
virsh-like command line.  This module imports nothing heavy so that ``virtshift
--help`` starts fast.
"""

__version__ = "0.1.0"
