"""The page served at `GET /`: a form over `POST /v1/images/generations`, self-contained (inline CSS and JS, no
external assets), that shows the generated images and the experts drawn."""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ddm serve: {title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }}
 form {{ display: grid; grid-template-columns: max-content 12em; gap: .4em 1em; align-items: center; }}
 #images img {{ width: 112px; height: 112px; image-rendering: pixelated; margin: 4px; border: 1px solid #ccc; }}
 figure {{ display: inline-block; margin: 0; text-align: center; font-size: .8em; }}
 #status {{ margin: 1em 0; color: #555; }} #status.error {{ color: #b00; }}
</style>
</head>
<body>
<h1>ddm serve</h1>
<p>Run <code>{run_id}</code>: images {shape}, {classes}.</p>
<form id="form">
 <label for="strategy">strategy</label><input id="strategy" name="strategy" value="prior">
 <label for="class">class</label><input id="class" name="class" type="number" min="0" placeholder="none">
 <label for="cfg_scale">guidance (cfg_scale)</label><input id="cfg_scale" name="cfg_scale" type="number" min="0"
   step="0.1" placeholder="run default">
 <label for="steps">steps</label><input id="steps" name="steps" type="number" min="1" placeholder="run default">
 <label for="seed">seed</label><input id="seed" name="seed" type="number" min="0" placeholder="run default">
 <label for="n">n</label><input id="n" name="n" type="number" min="1" value="4">
 <span></span><button id="generate" type="submit">Generate</button>
</form>
<div id="status"></div>
<div id="images"></div>
<script>
const form = document.getElementById("form");
const status = document.getElementById("status");
const images = document.getElementById("images");
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const body = {{strategy: form.strategy.value || "prior", n: Number(form.n.value || 1)}};
  for (const name of ["class", "cfg_scale", "steps", "seed"]) {{
    if (form[name].value !== "") body[name] = Number(form[name].value);
  }}
  status.className = ""; status.textContent = "generating...";
  images.replaceChildren();
  const t0 = performance.now();
  try {{
    const response = await fetch("v1/images/generations", {{method: "POST",
      headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body)}});
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.detail || response.statusText);
    reply.data.forEach((image, i) => {{
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + image.b64_json;
      const caption = document.createElement("figcaption");
      caption.textContent = reply.experts ? "expert " + reply.experts[i] : "#" + i;
      figure.append(img, caption); images.append(figure);
    }});
    status.textContent = reply.data.length + " images in " + ((performance.now() - t0) / 1000).toFixed(1) +
      " s (seed " + reply.request.seed + ", " + reply.request.steps + " " + reply.request.solver + " steps)";
  }} catch (err) {{
    status.className = "error"; status.textContent = "error: " + err.message;
  }}
}});
</script>
</body>
</html>
"""


def index_page(run_id: str, image_shape: tuple[int, ...], num_classes: int) -> str:
    """The page's HTML for a run (its id, image shape [H, W, C], number of classes; 0: unconditional)."""
    classes = f"{num_classes} classes (0..{num_classes - 1})" if num_classes else "unconditional"
    return _PAGE.format(title=html.escape(run_id[:12]), run_id=html.escape(run_id),
                        shape=html.escape("x".join(map(str, image_shape))), classes=html.escape(classes))
