"""`fusionrun-operator`: run the FusionRun operator (kopf) in the foreground.

    fusionrun-operator                       # cluster-wide (FUSIONRUN_NAMESPACES unset)
    fusionrun-operator -n team-a -n team-b   # only these namespaces
    fusionrun-operator --liveness http://0.0.0.0:8080/healthz

Settings come from the environment (see config.py); flags override the namespaces and liveness endpoint.
They are read here, once, into an OperatorConfig that the handlers get through kopf's memo.
One replica only (kopf runs standalone, without peering): deploy with strategy Recreate.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from fusionrun_operator.config import OperatorConfig, from_env
from fusionrun_operator.logs import setup_logging
from fusionrun_operator.runtime import Operator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fusionrun-operator", description=__doc__.split("\n")[0])
    ap.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="watch this namespace (repeatable); default: FUSIONRUN_NAMESPACES, else all",
    )
    ap.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    ap.add_argument("--liveness", default=None, help="liveness endpoint URL; default: FUSIONRUN_LIVENESS")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def settings(args: argparse.Namespace, env: Mapping[str, str]) -> OperatorConfig:
    """The operator's settings: the environment, with the flags in place of the variables they override."""
    overrides: dict[str, str] = {}
    if args.all_namespaces:
        overrides["FUSIONRUN_NAMESPACES"] = ""
    elif args.namespace:
        overrides["FUSIONRUN_NAMESPACES"] = ",".join(args.namespace)
    if args.liveness is not None:
        overrides["FUSIONRUN_LIVENESS"] = args.liveness
    return from_env({**env, **overrides})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = settings(args, os.environ)

    import kopf

    from fusionrun_operator import handlers  # noqa: F401  (registers the handlers)

    setup_logging(args.verbose)  # one handler: kopf's (logging.basicConfig beside it wrote lines twice)
    operator = Operator(cfg)
    if cfg.metrics_port:
        operator.metrics.serve(cfg.metrics_port)  # /metrics, a daemon thread
    kopf.run(
        standalone=True,
        clusterwide=cfg.clusterwide,
        namespaces=list(cfg.namespaces),
        liveness_endpoint=cfg.liveness,
        memo=kopf.Memo(operator=operator),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
