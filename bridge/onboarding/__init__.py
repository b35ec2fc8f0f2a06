"""Onboarding and drift: `plan`, `export-csv` and `reconcile` (docs/onboarding.md).

All three start from what the database implies for OneSignal, computed by the pipeline's own
mapping stage (`bridge.mapping.Mapper`) over the mapped tables (`desired.py`), so that what they
count, write and compare is what `run` would send:

- `plan.py`: read-only numbers before the first `run` (users, requests, duration, tag counts,
  rows that would be rejected);
- `csvexport.py`: OneSignal import files from a consistent snapshot, and the point `run` streams
  from afterwards;
- `reconcile.py`: compare with what OneSignal holds (`readers.py`: View user within its rate
  limit, or OneSignal's CSV export) and repair through the normal delivery path; also the
  continuous sampler `run` starts when `reconcile.interval_s` is set.
"""
