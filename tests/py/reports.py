"""Helpers for comparing smoe-opt reports between two runs of the same job."""


def comparable(report):
    """A report without what differs between two runs of the same job: paths, times, and
    the available memory quoted in the execution's reason."""
    r = dict(report)
    for k in ("input", "output", "saved", "seconds"):
        r.pop(k, None)
    for k, drop in (("execution", "reason"), ("calibration", "source")):
        if k in r:
            r[k] = {kk: v for kk, v in r[k].items() if kk != drop}
    return r
