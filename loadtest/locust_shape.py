"""The load shape of the locust test and the command-line options of the locustfile.

`--shape steps` (the default) steps the number of users through `--step-users` (1, 2, 4, ...,
64), holding each level for `--step-seconds`, to find the knee where latency rises faster than
throughput; `--shape fixed` runs `--users` users (spawned at `--spawn-rate`) for `--run-time`
(default 20 s), which is what the CI smoke test uses. Either way the test stops by itself:
after the last step, or at `--run-time` when that comes first. User classes marked `http_api`
run only when `--http-host` is given.
"""

from __future__ import annotations

from locust import LoadTestShape, events

DEFAULT_STEPS = "1,2,4,8,16,32,64"


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    """The locustfile's own options (also settable as LOCUST_* environment variables)."""
    g = parser.add_argument_group("shardserve")
    g.add_argument("--shape", choices=("steps", "fixed"), default="steps",
                   env_var="LOCUST_SHAPE",
                   help="steps: step users through --step-users; fixed: --users for --run-time")
    g.add_argument("--step-users", default=DEFAULT_STEPS, env_var="LOCUST_STEP_USERS",
                   help="user counts of the steps, comma-separated (default %(default)s)")
    g.add_argument("--step-seconds", type=float, default=30.0, env_var="LOCUST_STEP_SECONDS",
                   help="seconds each step lasts (default %(default)s)")
    g.add_argument("--mix", default=None, env_var="LOCUST_MIX",
                   help="workload weights, e.g. short_chat=6,long_prompt=2,long_generation=2")
    g.add_argument("--request-timeout", type=float, default=120.0,
                   env_var="LOCUST_REQUEST_TIMEOUT",
                   help="deadline of one request in seconds; DEADLINE_EXCEEDED is a failure")
    g.add_argument("--auth-token", default="", env_var="LOCUST_AUTH_TOKEN",
                   help="bearer token for a server started with --auth-token-file")
    g.add_argument("--http-host", default="", env_var="LOCUST_HTTP_HOST",
                   help="base URL of the OpenAI-compatible HTTP API (e.g. http://127.0.0.1:8000);"
                        " the HTTP user runs only when this is given")


def parse_steps(spec: str) -> list[int]:
    steps = [int(x) for x in spec.split(",") if x.strip()]
    if not steps or min(steps) < 1:
        raise ValueError(f"--step-users {spec!r}: need one or more counts >= 1")
    return steps


class StepShape(LoadTestShape):
    """Users in steps (--shape steps) or a fixed count (--shape fixed); stops by itself."""

    use_common_options = True  # reads --users, --spawn-rate and --run-time itself

    def tick(self):
        opts = self.runner.environment.parsed_options
        classes = [c for c in self.runner.user_classes
                   if opts.http_host or not getattr(c, "http_api", False)]
        t = self.get_run_time()
        limit = opts.run_time
        if opts.shape == "fixed":
            if t >= (limit or 20.0):
                return None
            users = opts.num_users or 1
            return users, opts.spawn_rate or users, classes
        steps = parse_steps(opts.step_users)
        i = int(t // opts.step_seconds)
        if i >= len(steps) or (limit and t >= limit):
            return None
        # reach the step's count within ~2 s: a step's users start together, as traffic would
        return steps[i], max(1.0, steps[i] / 2.0), classes
