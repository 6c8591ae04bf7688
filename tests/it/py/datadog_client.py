"""Drives an agent with Datadog's official `datadog` Python client: every call a service would make.

Usage: datadog_client.py HOST PORT ROUNDS. Prints what was sent, as `name=value` words, for the test to compare.
"""
import sys

from datadog import DogStatsd

host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
statsd = DogStatsd(host=host, port=port, disable_telemetry=True)
increments = decrements = 0
for i in range(rounds):
    statsd.increment("py.jobs", tags=["queue:mail"])
    increments += 1
    if i % 5 == 0:
        statsd.decrement("py.jobs", tags=["queue:mail"])
        decrements += 1
    statsd.gauge("py.inflight", 40 + i % 3)
    statsd.timing("py.timing", 10 + i % 20)
    statsd.histogram("py.hist", 100 + i)
    statsd.distribution("py.dist", 5 + i % 7, tags=["route:/a"])
statsd.gauge("py.inflight", 7)  # lower than the values before it: the last value, not the largest
statsd.flush()
statsd.close_socket()
print(
    f"jobs={increments - decrements} samples={rounds} last_gauge=7 timing_max={10 + min(rounds - 1, 19)}"
    f" hist_max={100 + rounds - 1} dist_max={5 + min(rounds - 1, 6)}"
)
