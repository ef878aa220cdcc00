"""The real-time page in headless Chromium, a wav file as the microphone (nightly; skipped without
a `chromium` binary). Driven over the DevTools protocol with the `websockets` client."""

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from kimia_jax.serving.server import BackgroundServer, ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Minimal DevTools-protocol session on one page target."""

    def __init__(self, ws_url):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv(timeout=60))
            if m.get("id") == i:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")


@pytest.mark.nightly
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_page_plays_a_reply_and_shows_its_transcript(kimia, engine, tmp_path):
    """The page records the fake microphone (a wav: silence, 1.2 s of voiced signal, silence),
    the server's VAD ends the turn, the reply's text appears in the transcript, its 24 kHz audio
    is scheduled for playback and the memory line shows the turn; a screenshot is saved
    (KIMIA_SCREENSHOT or tmp_path)."""
    sr = 48000
    t = np.arange(int(1.2 * sr)) / sr
    voice = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180, 360, 540)))
    mic = np.concatenate([np.zeros(sr // 2), 0.4 * voice / np.abs(voice).max(), np.zeros(2 * sr)])
    wav = tmp_path / "mic.wav"
    sf.write(wav, mic.astype(np.float32), sr, subtype="PCM_16")
    app = create_app(kimia, engine, ServerConfig())
    profile = tmp_path / "profile"
    with BackgroundServer(app) as server:
        proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                # played once: a looping file would speak again and barge in on the reply
                f"--use-file-for-fake-audio-capture={wav}%noloop",
                "--autoplay-policy=no-user-gesture-required",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            t0 = time.time()
            while not port_file.exists() or not port_file.read_text().strip():
                assert time.time() - t0 < 60, "chromium did not start"
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            page = next(x for x in targets if x["type"] == "page")
            dt = DevTools(page["webSocketDebuggerUrl"])
            dt.call("Page.enable")
            dt.call("Page.navigate", url=server.url + "/")
            t0 = time.time()
            while dt.eval("document.readyState") != "complete" or not dt.eval("!!window.kimia"):
                assert time.time() - t0 < 30
                time.sleep(0.2)
            dt.eval("document.getElementById('start').click()")
            time.sleep(1)
            status = dt.eval("document.body.innerText")
            t0 = time.time()
            while not (state := json.loads(dt.eval("JSON.stringify(window.kimia)")))["done"]:
                assert time.time() - t0 < 600, (
                    f"no reply; after the click: {status!r}; now: "
                    f"{dt.eval('document.body.innerText')!r}"
                )
                time.sleep(0.5)
            log = dt.eval("document.getElementById('log').innerText")
            page_text = dt.eval("document.body.innerText")
            shot = dt.call("Page.captureScreenshot", format="png")["data"]
            out = os.environ.get("KIMIA_SCREENSHOT") or str(tmp_path / "page.png")
            with open(out, "wb") as f:
                f.write(base64.b64decode(shot))
            dt.ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    reply = state["replies"][0]
    assert "you: (" in log and f"kimi: {reply}" in log and state["cancelled"] == 0
    assert state["audioSamples"] > 0
    assert "memory: 1 messages" in page_text, page_text  # the session.history of the turn
