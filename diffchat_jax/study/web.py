"""`study serve`: the blind pairwise page (paper Fig. 11). For each item the raw image and the instruction, and two
systems' images side by side in the annotator's left/right order (system names never shown); the annotator picks
left, tie or right, and the next item comes. The name is asked once and kept in the browser (localStorage), so
closing the browser and coming back resumes at the first item without a vote. Local by default; files are served
only from the eval folder.
"""
import os

from diffchat_jax.study.votes import Item, StudyError, Votes, left_first

CACHE = ".gradio"


def next_item(items: list[Item], voted: set[str]) -> tuple[int, Item | None]:
    """(how many are voted, the first item without a vote or None)."""
    todo = [item for item in items if item.key not in voted]
    return len(items) - len(todo), (todo[0] if todo else None)


def build(eval_dir: str, items: list[Item]):
    import gradio as gr  # pylint: disable=import-outside-toplevel
    votes = Votes(eval_dir)
    by_key = {item.key: item for item in items}

    def page(annotator: str):
        """The updates for the annotator's next item: instruction, raw, left, right, progress, item key, left
        system, and the name box's and the voting area's visibility."""
        annotator = (annotator or "").strip()
        if not annotator:
            return ("", None, None, None, "Type your name to start.", "", "", gr.update(visible=True),
                    gr.update(visible=False))
        done, item = next_item(items, votes.voted(annotator))
        if item is None:
            return ("", None, None, None, f"{annotator}: all {len(items)} items voted. Thank you!", "", "",
                    gr.update(visible=False), gr.update(visible=False))
        a_left = left_first(annotator, item)
        left, right = item.images if a_left else item.images[::-1]
        text = f"**Instruction:** {item.instruction}\n\n**Original prompt:** {item.source}"
        return (text, item.raw_image, left, right, f"{annotator}: item {done + 1} of {len(items)}", item.key,
                item.a if a_left else item.b, gr.update(visible=False), gr.update(visible=True))

    def start(name):
        name = (name or "").strip()
        return (name, *page(name))

    def choose(choice):
        def fn(annotator, key, left):
            if key in by_key:
                votes.vote(annotator, by_key[key], left, choice)
            return page(annotator)
        return fn

    with gr.Blocks(title="DiffChat preference study", analytics_enabled=False) as app:
        annotator = gr.BrowserState("", storage_key="diffchat-study-annotator")
        item_key, left_system = gr.State(""), gr.State("")
        gr.Markdown("## Which edited image follows the instruction better?\nCompare the two images with the "
                    "original; pick the one that better applies the instruction and keeps the rest of the image.")
        with gr.Row(visible=True) as name_row:
            name = gr.Textbox(label="your name (asked once)", elem_id="annotator")
            go = gr.Button("Start", variant="primary", elem_id="start")
        progress = gr.Markdown("Type your name to start.", elem_id="progress")
        with gr.Column(visible=False) as voting:
            instruction = gr.Markdown(elem_id="instruction")
            with gr.Row():
                raw = gr.Image(label="original", interactive=False, elem_id="raw", height=256)
                left = gr.Image(label="left", interactive=False, elem_id="left", height=256)
                right = gr.Image(label="right", interactive=False, elem_id="right", height=256)
            with gr.Row():
                buttons = [gr.Button(label, elem_id=f"vote-{choice}") for choice, label in
                           (("left", "Left is better"), ("tie", "Tie"), ("right", "Right is better"))]
        shown = [instruction, raw, left, right, progress, item_key, left_system, name_row, voting]
        go.click(start, [name], [annotator, *shown])
        name.submit(start, [name], [annotator, *shown])
        for choice, button in zip(("left", "tie", "right"), buttons):
            button.click(choose(choice), [annotator, item_key, left_system], shown, concurrency_limit=1)
        app.load(page, [annotator], shown)
    return app


def serve(eval_dir: str, items: list[Item], host: str = "127.0.0.1", port: int = 7861, share: bool = False,
          block: bool = True):
    if not items:
        raise StudyError("no items to show")
    os.makedirs(os.path.join(eval_dir, CACHE), exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = os.path.abspath(os.path.join(eval_dir, CACHE))
    app = build(eval_dir, items)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                           allowed_paths=[os.path.abspath(eval_dir)], quiet=True)
    print(f"study: {len(items)} items; serving on {url} (Ctrl-C stops); votes go to {eval_dir}/study.sqlite",
          flush=True)
    if block:
        try:
            app.block_thread()
        except KeyboardInterrupt:
            app.close()
    return app, url
