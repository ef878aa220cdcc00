"""The judge client against a real HTTP server on 127.0.0.1 (a stdlib http.server thread that
answers chat-completions with the fixture's canned replies): the scored result equals the Evalkit's
fixture, a re-run is served from the cache (0 requests), replay mode reads the cache, failures are
retried and then counted as judge errors."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from kimia_jax.evaluation import scoring
from kimia_jax.evaluation.judge_client import GPT4O_MINI_SYSTEM, HttpJudge, JudgeCache, ReplayJudge
from tests.evaluation.scoring_test import CLS, DATE, replay


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture()
def server():
    """Replies by prompt: the fixture judge answers the prompt was built for; '__500__' in a
    prompt makes the server fail."""
    answers: dict[str, str] = {}
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(
                {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
            )
            prompt = body["messages"][-1]["content"][0]["text"]
            if prompt not in answers:
                self.send_response(500)
                self.end_headers()
                return
            out = json.dumps({"choices": [{"message": {"content": answers[prompt]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = _Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}/v1", answers, seen
    srv.shutdown()
    srv.server_close()


def _teach(answers, name):
    """Fill the server's prompt -> reply table with the fixture replies for one result file."""
    ev = scoring.score_file(CLS / "results" / name, judge=replay(name), date=DATE)
    for it in ev.items:
        if it["judge_reply"] is not None:
            answers[it["judge_prompt"]] = it["judge_reply"]
    return ev


@pytest.mark.parametrize(
    "name", ["Kimi-Audio_MELD.jsonl", "Kimi-Audio_commoneval.jsonl", "Kimi-Audio_sd-qa.jsonl"]
)
def test_http_judge_scores_like_the_evalkit_and_caches(server, tmp_path, name):
    """(Files whose filled prompts are all distinct, so the server can answer by prompt.)"""
    url, answers, seen = server
    ev0 = _teach(answers, name)
    n = len(ev0.items)
    want = json.loads((CLS / "expected_performance.json").read_text())[name]
    cache = tmp_path / "judge_cache.jsonl"
    judge = HttpJudge(base_url=url, api_key="k", cache=JudgeCache(cache), backoff_s=0)
    ev = scoring.score_file(CLS / "results" / name, judge=judge, date=DATE)
    assert ev.performance == want
    assert judge.sent == len(seen) == n and not judge.failures
    b = seen[0]["body"]
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer k"
    assert b["model"] == "gpt-4o-mini" and b["n"] == 1
    assert b["messages"][0] == {"role": "system", "content": GPT4O_MINI_SYSTEM}
    temperature = 0.5 if "commoneval" in name else 0.0
    assert {k: b[k] for k in ("temperature", "top_p", "max_tokens", "stop")} == {
        "temperature": temperature, "top_p": 0.95, "max_tokens": 1024, "stop": None}  # fmt: skip
    # a re-run costs nothing
    again = HttpJudge(base_url=url, cache=JudgeCache(cache), backoff_s=0)
    assert scoring.score_file(CLS / "results" / name, judge=again, date=DATE).performance == want
    assert again.sent == 0 and len(seen) == n
    # replay mode: the cache alone
    ev2 = scoring.score_file(
        CLS / "results" / name, judge=ReplayJudge(JudgeCache(cache)), date=DATE
    )
    assert ev2.performance == want


def test_failed_calls_are_retried_then_counted_as_judge_errors(server, tmp_path):
    url, answers, seen = server
    name = "JudgeFailure_ClothoAQA.jsonl"
    _teach(answers, name)  # the second row's reply is a simulated failure: no answer -> HTTP 500
    judge = HttpJudge(base_url=url, cache=JudgeCache(tmp_path / "c.jsonl"), tries=3, backoff_s=0)
    ev = scoring.score_file(CLS / "results" / name, judge=judge, date=DATE)
    assert len(judge.failures) == 1 and judge.sent == len(seen) == 1 + 3
    assert ev.performance["performance"]["val"] == {"acc": 100.0, "valid": 1, "total": 2,
                                                    "correct": 1}  # fmt: skip
    assert any("failed after retries" in n and "AttributeError" in n for n in ev.notes)
    assert len(JudgeCache(tmp_path / "c.jsonl").log.done) == 1  # failures are never cached
    with pytest.raises(KeyError, match="no recorded reply"):
        empty = ReplayJudge(JudgeCache(tmp_path / "x.jsonl"))
        scoring.score_file(CLS / "results" / name, judge=empty, date=DATE)
