"""`python -m integrations.kubernetes render | discover | controller ...` (see each --help)."""
import importlib
import sys

COMMANDS = {
    "render": ("manifests", "print the manifests of a job (etcd, workers, RBAC, controller)"),
    "discover": ("discovery", "print the live worker pods as HOST:SLOTS lines (horovodrun)"),
    "controller": ("controller", "scale a job's worker pods to its desired size"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items())
        out = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print(f"usage: python -m integrations.kubernetes COMMAND ...\n{lines}", file=out)
        return 0 if out is sys.stdout else 2
    module = importlib.import_module(f"integrations.kubernetes.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
