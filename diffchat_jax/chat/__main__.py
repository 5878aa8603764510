"""`python -m diffchat_jax.chat --config=configs/chat.py[:tiny] [--config.x=...]`: chat with a DiffChat model.

    python -m diffchat_jax.chat --config=configs/chat.py:tiny                       # in the terminal
    python -m diffchat_jax.chat --config=configs/chat.py:tiny --script=turns.txt    # lines from a file
    printf 'a cat on a sofa\\nmake it snow\\n' | python -m diffchat_jax.chat --config=configs/chat.py:tiny
    python -m diffchat_jax.chat --config=configs/chat.py:tiny --web [--host=127.0.0.1 --port=7860]

The first line is the starting prompt (or /open FILE.png), every later line an instruction; /help lists the
commands. The session (session.json and one PNG per turn) goes to --config.session_dir (default
workdirs/chat/<date-time>); `/load DIR` or --load=DIR continues one.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from diffchat_jax import cli, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/chat.py[:tiny]; override with --config.a.b=v",
                                          lock_config=True)
_SCRIPT = flags.DEFINE_string("script", None, "Run the lines of this file (- = stdin), then exit; the first "
                              "refused line exits with status 2.")
_LOAD = flags.DEFINE_string("load", None, "Continue the session in this folder.")
_WEB = flags.DEFINE_bool("web", False, "Serve the chat in a browser (Gradio) instead of the terminal.")
_HOST = flags.DEFINE_string("host", None, "--web: the address to listen on (default config.web.host, 127.0.0.1).")
_PORT = flags.DEFINE_integer("port", None, "--web: the port (default config.web.port, 7860).")
_SHARE = flags.DEFINE_bool("share", False, "--web: also ask Gradio for a public share link (off by default).")


def main(argv):
    if len(argv) > 1:
        raise errors.ConfigError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.get("mode") != "chat":
        raise errors.ConfigError(f"--config: {config_flags.get_config_filename(flags.FLAGS['config'])} is not a "
                                 "chat config (configs/chat.py is)")
    from diffchat_jax.chat import engine, terminal
    if not _WEB.value:
        lines, script = terminal.line_source(_SCRIPT.value, sys.stdin)  # a bad --script is told before the models load
    chat = engine.Chat.from_config(config, folder=_LOAD.value)
    if _LOAD.value:
        chat.load(_LOAD.value)
    if _WEB.value:
        from diffchat_jax.chat import web
        web.serve(chat, host=_HOST.value or config.web.host, port=_PORT.value or config.web.port,
                  share=_SHARE.value or config.web.share)
        return
    sys.exit(terminal.run(chat, lines, script=script))


def run(argv=None):
    cli.run_app(main, __doc__, argv)


if __name__ == "__main__":
    run()
