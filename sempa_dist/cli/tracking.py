"""sempa-tracking replay RUN_DIR | parent NAME | end RUN_ID: the MLflow runs of sempa-train by hand.

    sempa-tracking replay runs/beta0.1                  # held-back values, once the server is back
    P=$(sempa-tracking parent beta-sweep)               # a sweep: each trial with tracking.parent_run_id=$P
    sempa-tracking end $P                               # then mark the sweep finished

The store is --uri, else $MLFLOW_TRACKING_URI, else the default run directory's embedded store
(runs/mlflow.db, the one sempa-train uses when neither is set); replay defaults to the run's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sempa_dist.redaction import redact_text
from sempa_dist.tracking import rundir, store


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line: one of the subcommands replay, parent, end."""
    ap = argparse.ArgumentParser(prog="sempa-tracking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("replay", help="send a run directory's held-back values to its store (or --uri)")
    p.add_argument("run_dir")
    p.add_argument("--uri", help="store to send to (default: the run's own, from tracking.json)")
    p.add_argument("--journal", action="store_true", help="send the whole journal, not only the pending values")
    p = sub.add_parser("parent", help="create a parent run for a sweep and print its id "
                                      "(pass it to each trial as tracking.parent_run_id=ID)")
    p.add_argument("name")
    p.add_argument("--uri", default=None)
    p.add_argument("--experiment", default="sempa")
    p = sub.add_parser("end", help="mark a (parent) run finished")
    p.add_argument("run_id")
    p.add_argument("--uri", default=None)
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 when it did its work (a store error raises, with MLflow's message)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.cmd == "replay":
        run_id, n = store.replay(args.run_dir, args.uri, args.journal)
        where = args.uri or rundir.read_state(Path(args.run_dir))["uri"]
        print(f"sent {n} values to run {run_id} in {redact_text(where)}")
        return 0
    uri = store.resolve_uri(args.uri)
    client = store.open_client(uri)
    if args.cmd == "parent":
        print(store.ensure_run(client, uri, args.experiment, None, args.name, {"run_kind": "sweep"}, False))
    else:
        client.set_terminated(args.run_id, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
