"""The chat in a browser (Gradio): `python -m diffchat_jax.chat --config=configs/chat.py[:tiny] --web`.

One session per server (the chat's session folder), as in the terminal: a conversation of instructions, streamed
rewritten prompts and images; a gallery of the branch's turns; model, seed and steps; undo, redo and branch; the
session as a zip. Gradio's queue runs one event at a time (concurrency 1), so renders on the one device never
overlap. It listens on 127.0.0.1 unless told otherwise, asks for no public link unless `--share`, and serves only
files inside the session folder (Gradio's own copies go to <session>/.gradio; allowed_paths is that folder).
Text from the user or the model is shown as text: the conversation does not render Markdown or HTML.
"""
import html
import os
import queue
import shutil
import threading

from diffchat_jax.chat import commands
from diffchat_jax.chat.engine import Chat, ChatError

TITLE = "DiffChat"
CACHE = ".gradio"  # Gradio's copies of served files, inside the session folder


def as_text(text: str) -> str:
    """Text for the conversation, which renders HTML even without Markdown: escaped, so it shows as typed."""
    return html.escape(text, quote=False)


def conversation(chat: Chat) -> list[dict]:
    """The branch up to the current turn as chat messages: each start or instruction, then its prompt and image."""
    messages = []
    for turn in chat.session.path():
        said = turn.instruction if turn.instruction is not None else f"(start) {turn.prompt}"
        messages.append({"role": "user", "content": as_text(said)})
        reply = turn.prompt + "".join(f"\n(note: {n})" for n in turn.notes)
        messages.append({"role": "assistant", "content": as_text(reply)})
        messages.append({"role": "assistant", "content": {"path": chat.image_path(turn), "alt_text": turn.prompt}})
    return messages


def gallery(chat: Chat) -> list[tuple[str, str]]:
    return [(chat.image_path(t), f"{t.id}: {t.prompt}") for t in chat.session.path()]


def status(chat: Chat, text: str = "") -> str:
    s = chat.settings
    head = chat.session.head
    where = f"turn {head} of {len(chat.session.turns)}" if head is not None else "no turns yet"
    return f"{text + ' · ' if text else ''}{where} · model {s.model} · seed {s.seed} · {s.steps} steps"


def session_zip(chat: Chat) -> str:
    """The session folder (session.json and the PNGs, not Gradio's cache) as <session>/.gradio/session.zip."""
    out_dir = os.path.join(chat.folder, CACHE)
    os.makedirs(out_dir, exist_ok=True)
    staging = os.path.join(out_dir, "session")
    shutil.rmtree(staging, ignore_errors=True)
    chat.save(staging)
    path = shutil.make_archive(os.path.join(out_dir, "session"), "zip", staging)
    shutil.rmtree(staging, ignore_errors=True)
    return path


def build(chat: Chat):
    """The gr.Blocks app of `chat`."""
    import gradio as gr  # pylint: disable=import-outside-toplevel

    def views(text=""):
        """The conversation, gallery, status line and the download's zip, after any change. (A DownloadButton
        serves the file it holds when clicked, so the zip is made with every change, not at the click.)"""
        return conversation(chat), gallery(chat), status(chat, text), session_zip(chat)

    def send(line, progress=gr.Progress()):
        """A line (a prompt, an instruction or a /command): the rewrite streams into the conversation, then the
        image; refused input leaves everything as it was and says why."""
        line = line or ""
        if line.strip().startswith("/") or chat.session.current is None:
            progress(0.5, desc="rendering")
            try:
                reply = commands.execute(chat, line)
            except (ChatError, commands.Quit) as e:
                yield line, *views(f"error: {e}" if isinstance(e, ChatError) else "use Ctrl-C in the terminal")
                return
            yield "", *views(reply.text.splitlines()[0] if reply.text else "")
            return
        updates, result = queue.Queue(), {}

        def work():
            try:
                result["turn"] = chat.instruct(line, on_text=updates.put)
            except Exception as e:  # pylint: disable=broad-except  # shown to the user, the app goes on
                result["error"] = e
            updates.put(None)

        base = conversation(chat) + [{"role": "user", "content": as_text(line)}]
        threading.Thread(target=work, daemon=True).start()
        text = ""
        while (update := updates.get()) is not None:
            text = update
            yield ("", base + [{"role": "assistant", "content": as_text(text)}], gallery(chat),
                   status(chat, "writing"), gr.update())
            progress(0.3, desc="writing the prompt")
        if "error" in result:
            error = result["error"]
            yield line, *views(f"error: {error}" if isinstance(error, ChatError) else f"failed: {error!r}")
            return
        yield "", *views("done")

    def act(name, *args):
        def fn(*values):
            try:
                text = commands.execute(chat, " ".join([name, *(str(int(v)) for v in values)])).text
            except ChatError as e:
                text = f"error: {e}"
            return *views(text), *settings_values()
        return fn

    def settings_values():
        return gr.update(value=chat.settings.model), chat.settings.seed, chat.settings.steps

    def set_model(name):
        chat.set_model(name)
        return status(chat, f"model {name}")

    def set_seed(seed):
        try:
            chat.set_seed(int(seed))
        except (ChatError, TypeError, ValueError) as e:
            return status(chat, f"error: {e}")
        return status(chat)

    def set_steps(steps):
        chat.set_steps(int(steps))
        return status(chat)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nType a starting prompt, then instructions that edit it (\"make it snow\"). "
                    "Lines starting with / are commands (/help).")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", height=520, render_markdown=False,
                                     elem_id="conversation", value=conversation(chat))
                with gr.Row():
                    box = gr.Textbox(label="prompt or instruction", placeholder="a cat sitting on a sofa",
                                     elem_id="instruction", scale=4, lines=1, max_lines=4)
                    send_button = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                note = gr.Markdown(status(chat), elem_id="status")
            with gr.Column(scale=2):
                turns = gr.Gallery(label="turns of this branch", columns=3, height=260, elem_id="gallery",
                                   value=gallery(chat))
                model = gr.Dropdown(list(chat.models), value=chat.settings.model, label="model", elem_id="model")
                seed = gr.Number(chat.settings.seed, label="seed", precision=0, elem_id="seed")
                steps = gr.Slider(1, 100, chat.settings.steps, step=1, label="steps", elem_id="steps")
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="undo")
                    redo = gr.Button("Redo", elem_id="redo")
                with gr.Row():
                    target = gr.Number(0, label="branch from turn", precision=0, elem_id="branch-turn")
                    branch = gr.Button("Branch", elem_id="branch")
                download = gr.DownloadButton("Download session (.zip)", value=session_zip(chat),
                                             elem_id="download")
        outputs = [box, chatbot, turns, note, download]
        box.submit(send, [box], outputs, concurrency_limit=1)
        send_button.click(send, [box], outputs, concurrency_limit=1)
        moved = [chatbot, turns, note, download, model, seed, steps]
        undo.click(act("/undo"), None, moved, concurrency_limit=1)
        redo.click(act("/redo"), None, moved, concurrency_limit=1)
        branch.click(act("/branch"), [target], moved, concurrency_limit=1)
        model.change(set_model, [model], [note])
        seed.change(set_seed, [seed], [note])
        steps.change(set_steps, [steps], [note])
    app.queue(default_concurrency_limit=1)
    return app


def serve(chat: Chat, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serves the app; returns (app, local URL). Files are served only from the session folder."""
    os.makedirs(os.path.join(chat.folder, CACHE), exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = os.path.abspath(os.path.join(chat.folder, CACHE))
    app = build(chat)
    print(f"DiffChat in the browser: session folder {chat.folder}", flush=True)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                           allowed_paths=[os.path.abspath(chat.folder)], show_error=True, quiet=False)
    print(f"serving on {url} (Ctrl-C stops)", flush=True)
    if block:
        try:
            app.block_thread()
        except KeyboardInterrupt:
            app.close()
    return app, url
