"""The page served at `GET /`: a form over `POST /v1/images/generations`, self-contained (inline CSS and JS, no
external assets). It shows the generated grid (each image captioned with its expert where the strategy fixes
one), a plot of the routing weights per step (each expert's mean weight over the images, from the reply's
`arrays.weights` [steps, n, K]), and the request's record with a button that sends it to `POST /v1/verify`.

Element ids are the page's interface (tests/test_page_browser.py drives them): form fields `strategy`, `class`,
`cfg_scale`, `steps`, `seed`, `n`, button `generate`; results `status`, `images` (one `figure` > `img` per
image), `routing` (an SVG, one `polyline.expert` per expert with one point per step), `record`, button
`verify`, `verdict` (its `data-honest` attribute "true" / "false" once answered).
"""

from __future__ import annotations

import html

_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ddm serve: {title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 64em; }}
 form {{ display: grid; grid-template-columns: max-content 12em; gap: .4em 1em; align-items: center; }}
 #images {{ display: grid; grid-template-columns: repeat(auto-fill, 120px); gap: 4px; }}
 #images img {{ width: 112px; height: 112px; image-rendering: pixelated; border: 1px solid #ccc; }}
 figure {{ margin: 0; text-align: center; font-size: .8em; }}
 #status {{ margin: 1em 0; color: #555; }} .error {{ color: #b00; }}
 #routing {{ border: 1px solid #ddd; background: #fff; }} #routing text {{ font-size: 11px; }}
 #record {{ max-height: 16em; overflow: auto; background: #f6f6f6; padding: .5em; font-size: .75em; }}
 #verdict[data-honest="true"] {{ color: #070; }} #verdict[data-honest="false"] {{ color: #b00; }}
 .hidden {{ display: none; }}
</style>
</head>
<body>
<h1>ddm serve</h1>
<p>Run <code>{run_id}</code>: images {shape}, {classes}.</p>
<form id="form">
 <label for="strategy">strategy</label><input id="strategy" name="strategy" value="{strategy_default}"
   list="strategies">
 <datalist id="strategies">{strategy_options}</datalist>
 <label for="class">class</label><select id="class" name="class"{class_disabled}>{class_options}</select>
 <label for="prompt">prompt</label><input id="prompt" name="prompt" type="text" placeholder="{prompt_hint}"
   {prompt_disabled}>
 <label for="cfg_scale">guidance (cfg_scale)</label><input id="cfg_scale" name="cfg_scale" type="number" min="0"
   step="0.1" placeholder="{cfg_default}"{guidance_disabled}>
 <label for="steps">steps</label><input id="steps" name="steps" type="number" min="1" max="{max_steps}"
   placeholder="{steps_default}">
 <label for="seed">seed</label><input id="seed" name="seed" type="number" min="0" placeholder="{seed_default}">
 <label for="n">n</label><input id="n" name="n" type="number" min="1" max="{max_n}" value="{n_default}">
 <span></span><button id="generate" type="submit">Generate</button>
</form>
<div id="status"></div>
<div id="images"></div>
<section id="results" class="hidden">
 <h2>Routing weights per step</h2>
 <svg id="routing" width="480" height="220" role="img" aria-label="routing weights per step"></svg>
 <p><small>Each expert's weight at each step's first velocity evaluation, averaged over the images (t runs from
 1, noise, at step 0 to 0 at the last step).</small></p>
 <h2>Record</h2>
 <button id="verify" type="button">Verify</button> <span id="verdict"></span>
 <details><summary>record JSON</summary><pre id="record"></pre></details>
</section>
<script>
"use strict";
(() => {{
  const form = document.getElementById("form");
  const statusLine = document.getElementById("status");
  const images = document.getElementById("images");
  const results = document.getElementById("results");
  const plot = document.getElementById("routing");
  const recordView = document.getElementById("record");
  const verifyButton = document.getElementById("verify");
  const verdict = document.getElementById("verdict");
  const SVG = plot.namespaceURI;  // the SVG namespace
  let record = null;

  function show(line, error) {{
    statusLine.className = error ? "error" : ""; statusLine.textContent = line;
  }}

  // An array of the wire format (`ddm.serve.schemas.encode_array`): little-endian float32 or int32 bytes.
  function decodeArray(wire) {{
    const raw = atob(wire.b64), bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    const view = new DataView(bytes.buffer), count = raw.length / 4, data = new Array(count);
    for (let i = 0; i < count; i++) {{
      data[i] = wire.dtype === "int32" ? view.getInt32(4 * i, true) : view.getFloat32(4 * i, true);
    }}
    return {{shape: wire.shape, data}};
  }}

  // The raw text of member `name` of the JSON object `text` (null when absent). A record goes back to
  // /v1/verify as these bytes: parsed and serialised again by JS, its floats that are whole numbers (a cfg_scale
  // of 2.0) would come back as integers, and its signature, made over the record as sent, would not match.
  function rawMember(text, name) {{
    const key = JSON.stringify(name);
    const skipString = (i) => {{  // i at an opening quote -> the index after the closing one
      for (i++; text[i] !== '"'; i++) if (text[i] === "\\") i++;
      return i + 1;
    }};
    const skipSpace = (i) => {{ while (/\s/.test(text[i])) i++; return i; }};
    let depth = 0;
    for (let i = 0; i < text.length;) {{
      const c = text[i];
      if (c === '"') {{
        const end = skipString(i), after = skipSpace(end);
        if (depth === 1 && text[after] === ":" && text.slice(i, end) === key) {{
          const start = skipSpace(after + 1);
          let j = start, level = 0;
          while (j < text.length) {{  // to the end of the value: an object, array, string or literal
            if (text[j] === '"') {{ j = skipString(j); if (level === 0) break; continue; }}
            if (text[j] === "{{" || text[j] === "[") level++;
            else if (text[j] === "}}" || text[j] === "]") level--;
            else if (level === 0 && /[\s,]/.test(text[j])) break;
            if (level < 0) break;
            j++;
            if (level === 0 && /[\]}}]/.test(text[j - 1])) break;
          }}
          return text.slice(start, j);
        }}
        i = end;
        continue;
      }}
      if (c === "{{" || c === "[") depth++;
      else if (c === "}}" || c === "]") depth--;
      i++;
    }}
    return null;
  }}

  function svg(name, attributes, text) {{
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    plot.append(node);
    return node;
  }}

  // weights [steps, n, K]: one polyline per expert, its mean weight over the n images at each step.
  function drawRouting(weights) {{
    const [steps, n, experts] = weights.shape;
    const width = 480, height = 220, left = 36, right = 90, top = 10, bottom = 30;
    const x = (s) => left + (steps > 1 ? s / (steps - 1) : 0.5) * (width - left - right);
    const y = (w) => top + (1 - w) * (height - top - bottom);
    plot.replaceChildren();
    svg("line", {{x1: left, y1: y(0), x2: width - right, y2: y(0), stroke: "#888"}});
    svg("line", {{x1: left, y1: y(0), x2: left, y2: y(1), stroke: "#888"}});
    for (const w of [0, 0.5, 1]) svg("text", {{x: 4, y: y(w) + 4}}, w.toFixed(1));
    svg("text", {{x: left, y: height - 8}}, "step 0");
    svg("text", {{x: width - right - 40, y: height - 8}}, "step " + (steps - 1));
    for (let k = 0; k < experts; k++) {{
      const points = [];
      for (let s = 0; s < steps; s++) {{
        let sum = 0;
        for (let i = 0; i < n; i++) sum += weights.data[(s * n + i) * experts + k];
        points.push(x(s).toFixed(1) + "," + y(sum / n).toFixed(1));
      }}
      const color = "hsl(" + Math.round(360 * k / experts) + ", 70%, 42%)";
      const line = svg("polyline", {{points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2,
                                     class: "expert", "data-expert": k}});
      line.append(Object.assign(document.createElementNS(SVG, "title"), {{textContent: "expert " + k}}));
      svg("text", {{x: width - right + 8, y: top + 12 + 14 * k, fill: color}}, "expert " + k);
    }}
  }}

  form.addEventListener("submit", async (event) => {{
    event.preventDefault();
    const body = {{n: Number(form.n.value || 1), record: true, arrays: true}};
    if (form.strategy.value !== "") body.strategy = form.strategy.value;
    for (const name of ["class", "cfg_scale", "steps", "seed"]) {{
      const field = form.elements[name];
      if (!field.disabled && field.value !== "") body[name] = Number(field.value);
    }}
    if (!form.prompt.disabled && form.prompt.value !== "") body.prompt = form.prompt.value;
    show("generating...", false);
    images.replaceChildren(); results.classList.add("hidden");
    verdict.textContent = ""; verdict.removeAttribute("data-honest"); record = null;
    const t0 = performance.now();
    try {{
      const response = await fetch("v1/images/generations", {{method: "POST",
        headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body)}});
      const text = await response.text();
      const reply = JSON.parse(text);
      if (!response.ok) throw new Error(reply.detail || response.statusText);
      reply.data.forEach((image, i) => {{
        const figure = document.createElement("figure");
        const img = document.createElement("img");
        img.src = "data:image/png;base64," + image.b64_json;
        img.alt = "image " + i;
        const caption = document.createElement("figcaption");
        caption.textContent = reply.experts ? "#" + i + ": expert " + reply.experts[i] : "#" + i;
        figure.append(img, caption); images.append(figure);
      }});
      drawRouting(decodeArray(reply.arrays.weights));
      record = rawMember(text, "record");
      // a record that names condition embeddings by digest is verified with them
      if (reply.arrays.conditions) record = '{{"record": ' + record + ', "conditions": ' +
        JSON.stringify(reply.arrays.conditions) + '}}';
      recordView.textContent = JSON.stringify(reply.record, null, 1);
      results.classList.remove("hidden");
      const request = reply.request;
      show(reply.data.length + " images in " + ((performance.now() - t0) / 1000).toFixed(1) + " s (strategy " +
           request.strategy + ", seed " + request.seed + ", " + request.steps + " " + request.solver + " steps" +
           (request.cfg_scale === null ? "" : ", cfg_scale " + request.cfg_scale) + ")", false);
    }} catch (err) {{
      show("error: " + err.message, true);
    }}
  }});

  verifyButton.addEventListener("click", async () => {{
    if (record === null) return;
    verdict.removeAttribute("data-honest"); verdict.textContent = "verifying...";
    try {{
      const response = await fetch("v1/verify", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                                                  body: record}});
      const answer = await response.json();
      if (!response.ok) throw new Error(answer.detail || response.statusText);
      verdict.dataset.honest = String(answer.honest);
      verdict.textContent = (answer.honest ? "honest" : "NOT honest") + " (" + answer.mode + " mode" +
        (answer.signature ? "; " + answer.signature : "") + ")" +
        (answer.problems.length ? ": " + answer.problems.join("; ") : "");
    }} catch (err) {{
      verdict.dataset.honest = "false"; verdict.textContent = "error: " + err.message;
    }}
  }});
}})();
</script>
</body>
</html>
"""


def _options(values: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(label)}</option>' for v, label in values)


def index_page(card: dict) -> str:
    """The page's HTML for a run, from its model card (`ddm.serve.app.model_card`: id, image_shape [H, W, C],
    classes (0: unconditional), class_names, conditioning, strategies, default_strategy, limits, defaults)."""
    classes, names = card["classes"], card.get("class_names") or []
    if classes:
        described = f"{classes} classes (0..{classes - 1})"
        labels = [(str(c), f"{c}: {names[c]}" if c < len(names) and str(names[c]) != str(c) else str(c))
                  for c in range(classes)]
        class_options = _options([("", "none"), *labels])
    else:
        described, class_options = "unconditional", _options([("", "none (unconditional run)")])
    conditioning = card.get("conditioning") or {}
    prompts = conditioning.get("kind") == "embeddings" and conditioning.get("prompts")
    if conditioning.get("kind") == "embeddings":
        described = f"conditioned on embeddings {conditioning['shape']}" + ("" if prompts else " (no text encoder)")
    prompt_hint = ("a prompt for every image" if prompts else "needs sample.condition_encoder"
                   if conditioning.get("kind") == "embeddings" else "none (no embeddings)")
    defaults, limits = card["defaults"], card["limits"]
    cfg_default = "run default" if defaults.get("cfg_scale") is None else f"{defaults['cfg_scale']} (run default)"
    return _PAGE.format(
        title=html.escape(card["id"][:12]), run_id=html.escape(card["id"]),
        shape=html.escape("x".join(map(str, card["image_shape"]))), classes=html.escape(described),
        strategy_options="".join(f'<option value="{html.escape(s)}">' for s in card["strategies"]),
        class_options=class_options, class_disabled="" if classes else " disabled",
        guidance_disabled="" if classes or prompts else " disabled",
        prompt_disabled="" if prompts else "disabled", prompt_hint=html.escape(prompt_hint),
        strategy_default=html.escape(card.get("default_strategy") or ""),
        cfg_default=html.escape(cfg_default), steps_default=html.escape(f"{defaults['steps']} (run default)"),
        seed_default=html.escape(f"{defaults['seed']} (run default)"), max_steps=int(limits["max_steps"]),
        max_n=int(limits["max_n"]), n_default=min(4, int(limits["max_n"])))
