"""The first message after start-up, with the bf16 copies kept at start-up (on) or made in its steps (off).

    .venv/bin/python docs/answers/first-message.py on|off     (from the repository root; reuses the data dir's probe timings)
"""
import sys, time, tempfile, shutil
from pathlib import Path
from sift_chat import config, probe
from sift_chat.engine import Engine
from sift_chat.corpus import ingest
from sift_chat.settings import ChatSettings
from sift_chat.events import Done
if sys.argv[1] == "off":
    probe.Compute.keep_copies = lambda self, model: None
home = Path(tempfile.mkdtemp())
(home / "models").symlink_to(config.data_dir() / "models")
shutil.copy(config.data_dir() / "compute.json", home / "compute.json")
t = time.perf_counter()
engine = Engine.load(home)
loaded = time.perf_counter() - t
ingest(engine.store, engine.embedder, [Path("corpora/brindlemoor")], embedder_name=engine.embedder_name, progress=False)
t = time.perf_counter()
for event in engine.respond("Who keeps the lighthouse?", [], ChatSettings()):
    if isinstance(event, Done): done = event
print(sys.argv[1], f"load {loaded:.2f} s; first message {time.perf_counter() - t:.2f} s;", engine.compute.describe()[:60])
