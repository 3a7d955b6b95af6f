"""`fusionrun-operator`: run the FusionRun operator (kopf) in the foreground.

    fusionrun-operator                       # cluster-wide (FUSIONRUN_NAMESPACES unset)
    fusionrun-operator -n team-a -n team-b   # only these namespaces
    fusionrun-operator --liveness http://0.0.0.0:8080/healthz

Settings come from the environment (see config.py); flags override the namespaces and liveness endpoint.
One replica only (kopf runs standalone, without peering): deploy with strategy Recreate.
"""

from __future__ import annotations

import argparse
import logging
import os


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Flags become the environment that config.from_env (read when handlers are imported) sees.
    if args.all_namespaces:
        os.environ["FUSIONRUN_NAMESPACES"] = ""
    elif args.namespace:
        os.environ["FUSIONRUN_NAMESPACES"] = ",".join(args.namespace)
    if args.liveness is not None:
        os.environ["FUSIONRUN_LIVENESS"] = args.liveness

    import kopf

    from fusionrun_operator import handlers  # registers the handlers

    cfg = handlers.CONFIG
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=cfg.clusterwide,
        namespaces=list(cfg.namespaces),
        liveness_endpoint=cfg.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
