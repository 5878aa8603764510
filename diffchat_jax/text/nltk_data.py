"""Installs the NLTK data the content-integrity code needs (WordNet, and the tagger where downloadable).

Run as `python -m diffchat_jax.text.nltk_data` (the Makefile does). Order of attempts:
    1. already installed: nothing to do;
    2. `nltk.download(...)` into `<sys.prefix>/nltk_data` (a folder nltk searches by default);
    3. offline fallback: WordNet 3.0 from Debian's `wordnet-base` package (installed with apt-get when we are
          root), copied into `<target>/corpora/wordnet/` with the `lexnames` file nltk needs generated from the
          `lexnames(5WN)` man page;
    4. otherwise a clear message saying what is missing and how to get it.
The averaged-perceptron tagger has no offline source; without it the keyword code uses TextBlob's
`PatternTagger` (see diffchat_jax/text/).
"""
import gzip
import os
import re
import shutil
import subprocess
import sys

DOWNLOADS = ("wordnet", "omw-1.4", "averaged_perceptron_tagger_eng")
DEBIAN_WORDNET = "/usr/share/wordnet"
DEBIAN_LEXNAMES_MAN = "/usr/share/man/man5/lexnames.5WN.gz"
# Syntactic category numbers of WordNet's lexicographer files, by name prefix (lexnames(5WN)).
LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def default_target() -> str:
    return os.environ.get("NLTK_DATA", "").split(os.pathsep)[0] or os.path.join(sys.prefix, "nltk_data")


def wordnet_works() -> bool:
    """Checks WordNet in a fresh interpreter, so a half-loaded corpus in this process cannot fool us."""
    code = "from nltk.corpus import wordnet as wn; assert wn.synsets('dog', 'n')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def try_nltk_download(target: str) -> None:
    import nltk  # pylint: disable=import-outside-toplevel
    for name in DOWNLOADS:
        try:
            ok = nltk.download(name, download_dir=target, quiet=True, raise_on_error=False)
        except Exception as e:  # pylint: disable=broad-except  # offline machines fail in many ways
            ok = False
            print(f"nltk.download({name!r}) failed: {e}")
        print(f"nltk.download({name!r}): {'ok' if ok else 'not available'}")


def lexnames_from_man_page(man_gz: str) -> str:
    """Rebuilds WordNet's `lexnames` file (`NN<TAB>name<TAB>category`) from the lexnames(5WN) man page."""
    with gzip.open(man_gz, "rt", encoding="utf-8", errors="replace") as f:
        rows = re.findall(r"^(\d\d)\t(\w+\.\w+)\s*\t", f.read(), flags=re.MULTILINE)
    if not rows:
        raise ValueError(f"{man_gz}: no lexicographer file table found")
    return "".join(f"{num}\t{name}\t{LEX_CATEGORY[name.split('.')[0]]}\n" for num, name in rows)


def install_debian_wordnet(target: str) -> None:
    if not os.path.isdir(DEBIAN_WORDNET) and shutil.which("apt-get") and os.geteuid() == 0:
        print("Installing WordNet 3.0 from Debian packages (wordnet-base, wordnet-sense-index)...")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                        "wordnet-base", "wordnet-sense-index"], check=False)
    if not (os.path.isdir(DEBIAN_WORDNET) and os.path.exists(DEBIAN_LEXNAMES_MAN)):
        return
    dest = os.path.join(target, "corpora", "wordnet")
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(DEBIAN_WORDNET):  # copies, not symlinks: nltk's reader rejects some links
        shutil.copyfile(os.path.join(DEBIAN_WORDNET, name), os.path.join(dest, name))
    with open(os.path.join(dest, "lexnames"), "w", encoding="utf-8") as f:
        f.write(lexnames_from_man_page(DEBIAN_LEXNAMES_MAN))
    print(f"WordNet copied from {DEBIAN_WORDNET} into {dest}")


def main() -> int:
    target = default_target()
    if wordnet_works():
        print(f"NLTK WordNet: already installed (nltk data searched incl. {target})")
        return 0
    os.makedirs(target, exist_ok=True)
    try_nltk_download(target)
    if not wordnet_works():
        install_debian_wordnet(target)
    if wordnet_works():
        print(f"NLTK WordNet: installed under {target}")
        return 0
    print("WARNING: NLTK WordNet is not installed. The content-integrity score (diffchat_jax.text) needs it.\n"
                "  With network access: python -c \"import nltk; nltk.download('wordnet')\"\n"
                "  On Debian/Ubuntu offline: apt-get install wordnet-base wordnet-sense-index, then rerun\n"
                "  python -m diffchat_jax.text.nltk_data", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
