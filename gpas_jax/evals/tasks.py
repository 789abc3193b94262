"""Offline harness tasks: small task files in the standard tasks' formats, read from local or gs://.

`write_tasks(out_dir, texts)` writes two tasks built from held-out documents, each a JSON-lines
data file and a YAML config that lm-eval reads with `dataset_path: json` (nothing downloads):
  gpas_mc   multiple choice in ARC's schema and prompt (question, choices.text/label, answerKey;
            acc, acc_norm): a document's opening words, and which of four spans follows them
  gpas_ppl  rolling perplexity in wikitext's schema (page; word_perplexity, byte_perplexity,
            bits_per_byte), long pages spanning several context windows
The YAML names its data file by absolute path (lm-eval resolves `data_files` against the working
directory, not the YAML), so a task directory is written where it will be read; lm-eval reads the
YAML from a local folder (--include_path), the data files may stay in a bucket (`datasets` counts
gs:// as online: HF_HUB_OFFLINE must be unset for them).
"""

import json
from typing import Iterable, Sequence

from gpas_jax import storage

MC_TASK = 'gpas_mc'
PPL_TASK = 'gpas_ppl'
LABELS = ('A', 'B', 'C', 'D')

# ARC-Easy's prompt and metrics (lm_eval/tasks/arc/arc_easy.yaml), our data file.
_MC_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# wikitext's rolling log-likelihood and metrics (lm_eval/tasks/wikitext/wikitext.yaml).
_PPL_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def _words(text: str) -> list[str]:
  return ' '.join(text.split()).split(' ')


def mc_items(texts: Sequence[str], n: int, question_words: int = 8,
             answer_words: int = 4) -> list[dict]:
  """ARC-schema items: the first words of a document, its next words among three other
  documents' spans at the same place; the right answer's label cycles A-D."""
  spans = []
  for text in texts:
    w = _words(text)
    if len(w) >= question_words + answer_words:
      spans.append((' '.join(w[:question_words]),
                    ' '.join(w[question_words:question_words + answer_words])))
  if len(spans) < 4:
    raise ValueError(f'{len(spans)} documents are long enough for a question; 4 are needed.')
  items = []
  for i in range(min(n, len(spans))):
    question, answer = spans[i]
    others = [spans[(i + k) % len(spans)][1] for k in (1, 2, 3)]
    key = i % len(LABELS)
    choices = others[:key] + [answer] + others[key:]
    items.append({'id': f'{MC_TASK}-{i}', 'question': question,
                  'choices': {'text': choices, 'label': list(LABELS)}, 'answerKey': LABELS[key]})
  return items


def ppl_items(texts: Iterable[str], n: int, max_chars: int = 600) -> list[dict]:
  """wikitext-schema pages: the first max_chars characters of n non-empty documents."""
  pages = [{'page': t[:max_chars]} for t in texts if t.strip()]
  return pages[:n]


def write_tasks(out_dir: str, texts: Sequence[str], n_mc: int = 24, n_ppl: int = 8) -> list[str]:
  """Writes gpas_mc and gpas_ppl (data + YAML) under out_dir; returns the task names."""
  out_dir = storage.absolute(out_dir)
  storage.makedirs(out_dir)
  for task, items, yaml in ((MC_TASK, mc_items(texts, n_mc), _MC_YAML),
                            (PPL_TASK, ppl_items(texts, n_ppl), _PPL_YAML)):
    data = storage.join(out_dir, f'{task}.jsonl')
    storage.write_text(data, ''.join(json.dumps(it, ensure_ascii=False) + '\n' for it in items))
    storage.write_text(storage.join(out_dir, f'{task}.yaml'), yaml.format(task=task, data=data))
  return [MC_TASK, PPL_TASK]
