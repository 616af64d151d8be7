-- wrk script for the post workload: every request POSTs a 64 KiB body to /post, whose
-- backend answers "ok" only once it has read the whole body. bench.py runs it with
-- report.lua appended (wrk takes one script), for the totals as one JSON line.
wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
