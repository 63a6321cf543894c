"""Block-job state machine (:mod:`.machine`) and restart reconciliation (:mod:`.reconcile`).

Both modules are pure: they turn a recorded :class:`~virtshift.model.job.BlockJob`
and what QEMU said into a new job and a list of effects.  They send no QMP
command, read no file and take no lock; :mod:`virtshift.runtime` does that.
"""
