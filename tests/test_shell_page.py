"""The page in real headless Chromium, two at once against a server that gives each client its own avatar:
each chooses a different photo through the page's file input (set over the DevTools protocol, as a user's
choice would be), and each receives its own video. Screenshots go to tests/artifacts/."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("websockets")

from streaming.avatars import AvatarPool  # noqa: E402
from streaming.server import AvatarServer  # noqa: E402
from streaming.testing import PortraitAnimator, chromium  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
RED, BLUE = (220, 40, 40), (40, 60, 220)
SIZE = "--window-size=1100,1000"          # the whole page in the screenshots


class DevTools:
    """The DevTools protocol of one Chromium page, over its WebSocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    @classmethod
    async def attach(cls, profile: Path, timeout: float = 20):
        from websockets.asyncio.client import connect
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:                    # Chromium writes its port here once it listens
            port_file = profile / "DevToolsActivePort"
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text().split()[0])
                targets = await asyncio.to_thread(
                    lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list")))
                pages = [t for t in targets if t["type"] == "page"]
                if pages:
                    break
            assert loop.time() < deadline, "Chromium's DevTools never came up"
            await asyncio.sleep(0.2)
        return cls(await connect(pages[0]["webSocketDebuggerUrl"], max_size=None))

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, (method, msg["error"])
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def choose_file(self, selector: str, path: Path) -> None:
        root = await self.call("DOM.getDocument")
        node = await self.call("DOM.querySelector", nodeId=root["root"]["nodeId"], selector=selector)
        await self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


# the colour of the video's top-left corner as this page shows it (the pts bars run mid-picture); null
# until a picture is painted
VIDEO_CORNER = """(() => { const v = document.getElementById("video"); if (!v || !v.videoWidth) return null;
  const c = document.createElement("canvas"); c.width = c.height = 16; const g = c.getContext("2d");
  g.drawImage(v, 0, 0, 16, 16); const px = g.getImageData(1, 1, 4, 4).data; const m = [0, 0, 0];
  for (let i = 0; i < px.length; i += 4) for (let k = 0; k < 3; k++) m[k] += px[i + k] / 16;
  return m[0] + m[1] + m[2] > 30 ? m : null; })()"""


async def until(check, timeout: float):
    """Await check() until it returns something truthy; that value (or the last one at timeout)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    return value


@needs_chromium
def test_two_pages_choose_their_own_portraits_and_see_their_own_avatars(tmp_path):
    from PIL import Image
    ARTIFACTS.mkdir(exist_ok=True)
    photos = {}
    for name, color in (("red", RED), ("blue", BLUE)):
        photos[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (600, 400), color).save(photos[name])    # larger than 512: the page shrinks it

    class Slow(PortraitAnimator):
        """Draws about 12 frames/s whatever it is given: a machine that cannot keep 25."""
        def _emit(self):
            frames = super()._emit()
            time.sleep(0.08 * len(frames))
            return frames

    def make(rgb):          # the blue photo's avatar runs on a "slow machine", the others at full speed
        slow = rgb is not None and rgb[0, 0, 2] > 150
        return (Slow if slow else PortraitAnimator)(rgb, size=128)

    async def main():
        pool = AvatarPool(make, max_sessions=2)
        async with AvatarServer(avatars=pool, port=0) as server:
            page = f"http://127.0.0.1:{server.port}/"
            with chromium(page, tmp_path / "a", SIZE), chromium(page, tmp_path / "b", SIZE):
                tabs = [await DevTools.attach(tmp_path / p) for p in ("a", "b")]
                for tab in tabs:        # both connected, each with the default (grey) avatar
                    grey = await until(lambda: tab.js(VIDEO_CORNER), 30)
                    assert grey and max(abs(c - 128) for c in grey) < 20, grey
                assert pool.count == 2
                for tab, name in zip(tabs, photos):
                    await tab.choose_file("#portrait", photos[name])
                seen = []
                for tab, color in zip(tabs, (RED, BLUE)):
                    def wearing(tab=tab, color=color):
                        async def check():
                            c = await tab.js(VIDEO_CORNER)
                            return c if c and max(abs(a - b) for a, b in zip(c, color)) < 30 else None
                        return check
                    seen.append(await until(wearing(), 30))
                print("video corners seen by the two pages:", seen)
                assert all(seen), seen                          # each page shows its own photo ...
                assert max(abs(a - b) for a, b in zip(*seen)) > 100    # ... and they differ
                text = await until(lambda: tabs[0].js(
                    'document.body.innerText.includes("Frame rate") && document.body.innerText'), 10)
                print(text)
                slow = await until(lambda: tabs[1].js(
                    'document.body.innerText.includes("This machine renders") && document.body.innerText'), 15)
                print(slow)
                assert slow and "fewer than the 25" in slow           # it draws 12.5 frames/s at most
                assert "Talk to an avatar" in text and "Choose a photo" in text
                for word in ("Latency", "Frame rate", "Skipped frames", "Avatars on this server: 2 of 2"):
                    assert word in text, (word, text)
                assert "{" not in text                          # words, not a JSON dump
                assert await tabs[0].js('document.getElementById("pose").offsetParent === null')   # no controls
                for tab, name in zip(tabs, photos):
                    await tab.screenshot(ARTIFACTS / f"page-{name}.png")
                # a third page is turned away, and says why
                with chromium(page, tmp_path / "c", SIZE):
                    tab = await DevTools.attach(tmp_path / "c")
                    text = await until(lambda: tab.js(
                        'document.body.innerText.includes("full") && document.body.innerText'), 20)
                    await tab.screenshot(ARTIFACTS / "page-full.png")
                    assert "The server is full: it runs 2 avatars at once" in text, text
                for tab in tabs:
                    await tab.ws.close()
        assert (ARTIFACTS / "page-red.png").stat().st_size > 10_000
    asyncio.run(main())
