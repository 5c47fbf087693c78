"""Train a tokenizer on an export's captions: Hugging Face ``tokenizers`` BPE or SentencePiece.

    python -m trainer.tokenizer --data EXPORT --kind bpe|sentencepiece --vocab-size N --out DIR
                                [--sample N] [--captions original|recaption|both] [--seed S]
                                [--model-type unigram|bpe] [--threads T]

Captions stream from the export's Parquet (``caption``, ``recaption`` or both), or from the tars'
``KEY.txt`` members for a folder of tars without Parquet. ``--sample N`` keeps the N captions whose
seeded hash of (seed, uid or caption) is smallest: the same N whatever the shard order or the number
of files, and the same tokenizer files on every rerun.

The output folder holds the tokenizer and ``provenance.json`` (the source, its manifest's sha256, the
caption field, sample, seed, caption count, library versions, and the command that made it). Point a
recipe at it:
  bpe:           --set tokenizer.kind=hf tokenizer.name=DIR tokenizer.vocab_size=N
  sentencepiece: --set tokenizer.kind=sentencepiece tokenizer.name=DIR/spm.model tokenizer.vocab_size=N
Both keep open_clip's convention of lower-cased text with start/end-of-text tokens; the trainer pools the
text tower at the end-of-text token.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("trainer.tokenizer")

TOOL = "trainer.tokenizer"
PAD, BOS, EOS, UNK = "<pad>", "<start_of_text>", "<end_of_text>", "<unk>"
BYTE_ALPHABET = 256


class TokenizerError(ValueError):
    """A user mistake: one line, exit 2."""


def _parquet_files(root: Path) -> list[Path]:
    folder = root / "shards" if (root / "shards").is_dir() else root
    return sorted(folder.glob("*.parquet"))


def iter_captions(data: str, field: str = "original") -> Iterator[tuple[str, str]]:
    """(identity, caption) for every caption of the export; identity is the row's uid (+ field) when known."""
    from curate import schema

    root = Path(data)
    files = _parquet_files(root)
    if files:
        import pyarrow.parquet as pq

        wanted = {"original": [schema.CAPTION], "recaption": [schema.RECAPTION],
                  "both": [schema.CAPTION, schema.RECAPTION]}[field]
        for f in files:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise TokenizerError(f"{f} has no {missing[0]!r} column (--captions {field}); "
                                     f"use --captions original or recaption the dataset first")
            cols = [*wanted, *([schema.UID] if schema.UID in names else [])]
            for i, batch in enumerate(pf.iter_batches(columns=cols, batch_size=8192)):
                rows = batch.to_pydict()
                uids = rows.get(schema.UID) or [f"{f.name}:{i}:{j}" for j in range(batch.num_rows)]
                for c in wanted:
                    for uid, text in zip(uids, rows[c], strict=True):
                        if text:
                            yield f"{uid}/{c}", text
        return
    folder = root / "shards" if (root / "shards").is_dir() else root
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise TokenizerError(f"{data}: no Parquet shards and no tars to read captions from")
    if field != "original":
        raise TokenizerError(f"{data} has tars only: their .txt captions are the originals; use --captions original")
    for tar in tars:
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isreg() and info.name.endswith(".txt"):
                    text = tf.extractfile(info).read().decode("utf-8")
                    if text:
                        yield f"{tar.name}/{info.name}", text


def select(captions: Iterator[tuple[str, str]], sample: int | None, seed: int) -> tuple[list[str], int]:
    """(the captions to train on, how many there were): all, or the ``sample`` with the smallest seeded hash."""
    if sample is None:
        out = [text for _, text in captions]
        return out, len(out)
    heap: list[tuple[int, str, str]] = []  # max-heap on the hash through negation
    seen = 0
    for ident, text in captions:
        seen += 1
        h = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{ident}".encode(), digest_size=8).digest(), "big")
        if len(heap) < sample:
            heapq.heappush(heap, (-h, ident, text))
        elif -heap[0][0] > h:
            heapq.heapreplace(heap, (-h, ident, text))
    # a fixed order (by hash) so the trainer sees the same sequence on every rerun
    return [text for _, _, text in sorted(heap, key=lambda t: (-t[0], t[1]))], seen


def train_bpe(captions: list[str], vocab_size: int, out: Path) -> int:
    """Byte-level BPE (lower-cased, NFC) saved as a transformers fast-tokenizer folder; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer, length=len(captions))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1_000_000)
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def train_sentencepiece(captions: list[str], vocab_size: int, out: Path, model_type: str, threads: int) -> int:
    """A SentencePiece model (unigram or BPE) with pad 0, unk 1, start 2, end 3; returns its size."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding: lower-cased, as open_clip's BPE
        character_coverage=0.9995, hard_vocab_limit=False, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=threads, minloglevel=2,
    )
    (out / "spm.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    (out / "spm.vocab").write_text("".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                                           for i in range(sp.get_piece_size())), encoding="utf-8")
    return sp.get_piece_size()


def _manifest_sha(root: Path) -> str | None:
    m = root / "_manifest.json"
    return hashlib.sha256(m.read_bytes()).hexdigest() if m.is_file() else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tokenizers", "transformers", "sentencepiece"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_out(out: Path) -> None:
    """An existing output folder is replaced only when this tool wrote it."""
    if out.exists() and any(out.iterdir()):
        prov = out / "provenance.json"
        if not prov.is_file() or json.loads(prov.read_text()).get("tool") != TOOL:
            raise TokenizerError(f"{out} exists and was not written by {TOOL}; choose another --out")


def build(args: argparse.Namespace) -> dict:
    """Train and write the tokenizer; returns the provenance record."""
    out = Path(args.out)
    _check_out(out)
    root = Path(args.data)
    if not root.exists():
        raise TokenizerError(f"--data {args.data}: no such export")
    captions, seen = select(iter_captions(args.data, args.captions), args.sample, args.seed)
    if not captions:
        raise TokenizerError(f"{args.data}: no captions to train on")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if args.kind == "bpe":
        if args.vocab_size <= BYTE_ALPHABET + 3:
            raise TokenizerError(f"--vocab-size {args.vocab_size} leaves no room for merges: byte-level BPE needs "
                                 f"more than {BYTE_ALPHABET + 3} (256 bytes + 3 special tokens)")
        size = train_bpe(captions, args.vocab_size, tmp)
        use = f"tokenizer.kind=hf tokenizer.name={out.resolve()} tokenizer.vocab_size={size}"
    else:
        try:
            size = train_sentencepiece(captions, args.vocab_size, tmp, args.model_type, args.threads)
        except RuntimeError as e:  # SentencePiece's own account of what the corpus cannot give
            shutil.rmtree(tmp, ignore_errors=True)
            raise TokenizerError(f"SentencePiece refused: {e}") from None
        use = f"tokenizer.kind=sentencepiece tokenizer.name={out.resolve() / 'spm.model'} tokenizer.vocab_size={size}"
    files = sorted(p.name for p in tmp.iterdir())
    prov = {
        "tool": TOOL, "kind": args.kind, "model_type": args.model_type if args.kind == "sentencepiece" else "bpe",
        "vocab_size_requested": args.vocab_size, "vocab_size": size,
        "source": {"data": str(root.resolve()), "manifest_sha256": _manifest_sha(root), "captions_seen": seen},
        "captions": args.captions, "sample": args.sample, "seed": args.seed, "captions_used": len(captions),
        "special_tokens": {"pad": PAD, "start": BOS, "end": EOS}, "files": files, "libraries": _versions(),
        "recipe_set": use,
        "command": " ".join(["python -m trainer.tokenizer", "--data", str(root.resolve()), "--kind", args.kind,
                             "--vocab-size", str(args.vocab_size), "--out", str(out.resolve()), "--captions",
                             args.captions, "--seed", str(args.seed)]
                            + (["--sample", str(args.sample)] if args.sample else [])
                            + (["--model-type", args.model_type] if args.kind == "sentencepiece" else [])),
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # ours (checked above)
    os.replace(tmp, out)
    return prov


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="export (Parquet + tars) or a folder of tars")
    p.add_argument("--kind", required=True, choices=("bpe", "sentencepiece"))
    p.add_argument("--vocab-size", type=int, required=True, help="e.g. 49408 (BPE), 65536 (SentencePiece)")
    p.add_argument("--out", required=True, help="output folder (replaced only if this tool wrote it)")
    p.add_argument("--sample", type=int, default=None, help="train on N captions (seeded choice); default all")
    p.add_argument("--captions", choices=("original", "recaption", "both"), default="original")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="SentencePiece model")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="SentencePiece threads")
    args = p.parse_args(argv)
    if args.vocab_size < 8:
        p.error("--vocab-size must be at least 8")
    if args.sample is not None and args.sample < 1:
        p.error("--sample must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        prov = build(args)
    except (TokenizerError, OSError) as e:
        print(f"trainer.tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"{prov['kind']} tokenizer, {prov['vocab_size']} tokens from {prov['captions_used']} captions -> {args.out}")
    print(f"use it: --set {prov['recipe_set']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
