"""Pictures of a job for people: the live terminal view (`job status --watch`) and the HTML report
(`job report`), both drawn from the admin API's JobStatus; the per-round text table they share is
:mod:`fedtune.report`."""
