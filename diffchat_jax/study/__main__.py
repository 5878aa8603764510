"""The human-preference study of an eval's images (paper appendix A.6, Fig. 5 and 11).

    python -m diffchat_jax.study serve --eval=EVAL_WORKDIR --systems=A,B[,C...] --model=NAME [--host --port --share]
    python -m diffchat_jax.study report --eval=EVAL_WORKDIR

serve: every pair of the systems on every row that has their images (image 0) and the raw image, blind and in a
random left/right order per annotator; votes in EVAL_WORKDIR/study.sqlite (one per annotator and item; a second
vote replaces the first). report: win / tie / lose of each pair with bootstrap 95% intervals, as study.md,
study.csv and study.png in EVAL_WORKDIR.
"""
import argparse
import os
import sys

from diffchat_jax import errors


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.ConfigError(f"{message}; see --help")


def parse(argv):
    p = Parser(prog="python -m diffchat_jax.study", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the voting page")
    serve.add_argument("--eval", required=True, help="an eval workdir (configs/eval.py) with images")
    serve.add_argument("--systems", required=True, help="comma-separated systems of that eval, two or more")
    serve.add_argument("--model", required=True, help="the SD model whose images are compared (eval.models)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7861)
    serve.add_argument("--share", action="store_true", help="also ask Gradio for a public link (off by default)")
    report = sub.add_parser("report", help="study.md, study.csv and study.png from the votes")
    report.add_argument("--eval", required=True)
    return p.parse_args(argv)


def run(argv) -> None:
    from diffchat_jax.study import report, votes, web
    args = parse(argv)
    if not os.path.isdir(args.eval):
        raise errors.ConfigError(f"--eval: {args.eval} is not a folder")
    try:
        if args.command == "serve":
            items = votes.study_items(args.eval, [s.strip() for s in args.systems.split(",") if s.strip()],
                                      args.model)
            web.serve(args.eval, items, args.host, args.port, args.share)
        else:
            results = report.write_report(args.eval)
            print(report.markdown(results))
            print(f"written: {', '.join(os.path.join(args.eval, f) for f in ('study.md', 'study.csv', 'study.png'))}")
    except votes.StudyError as e:
        raise errors.ConfigError(str(e)) from None


if __name__ == "__main__":
    errors.run_command(run, sys.argv[1:])
