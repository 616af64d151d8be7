-- wrk script: prints exact totals as one JSON line at the end (no per-request hooks, so
-- wrk keeps its fast path). bench.py parses the line that starts with BENCH_JSON.
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "bytes": %d, "duration_us": %d, ' ..
      '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, ' ..
      '"timeouts": %d, "latency_mean_us": %.1f, "latency_max_us": %.1f, ' ..
      '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f}\n',
      summary.requests, summary.bytes, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
