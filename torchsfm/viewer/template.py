"""The viewer page: HTML, CSS and a small canvas-2D point/frustum renderer, all inline.

No WebGL (works in any browser, also headless and over remote desktops), no network access.
Points are splatted into an ImageData with a z-buffer; camera frusta are canvas lines drawn
over them. `__TITLE__` and `__SCENE_JSON__` are substituted by `torchsfm.viewer.html`.
"""

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  html, body { margin: 0; height: 100%; overflow: hidden; background: #14161b; color: #dde1e8;
               font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; }
  canvas { display: block; width: 100vw; height: 100vh; cursor: grab; }
  canvas.dragging { cursor: grabbing; }
  #panel { position: absolute; top: 10px; left: 10px; background: rgba(20, 22, 27, 0.82);
           border: 1px solid #2c313a; border-radius: 6px; padding: 8px 10px; max-width: 340px;
           max-height: calc(100vh - 40px); overflow: auto; }
  #panel h1 { font-size: 14px; margin: 0 0 4px 0; font-weight: 600; word-break: break-all; }
  #panel .stats { color: #9aa3b2; margin-bottom: 6px; }
  #panel label { display: flex; align-items: center; gap: 6px; cursor: pointer; white-space: nowrap; }
  #panel .swatch { width: 12px; height: 12px; border-radius: 2px; flex: none; }
  #panel .help { color: #7d8595; margin-top: 6px; font-size: 12px; }
  #tip { position: absolute; pointer-events: none; display: none; background: rgba(10, 11, 14, 0.92);
         border: 1px solid #3a404b; border-radius: 5px; padding: 6px 8px; max-width: 360px; }
  #tip img { display: block; margin-top: 5px; max-width: 320px; border-radius: 3px; }
  #tip .name { font-weight: 600; word-break: break-all; }
  #tip .sub { color: #9aa3b2; }
  #err { position: absolute; bottom: 10px; left: 10px; color: #ff8080; white-space: pre-wrap; }
</style>
</head>
<body>
<canvas id="view"></canvas>
<div id="panel"><h1 id="title"></h1><div class="stats" id="stats"></div><div id="legend"></div>
<div class="help">drag: orbit &middot; right/shift-drag: pan &middot; wheel: zoom &middot; hover: image name<br>
+/&minus;: point size &middot; [ ]: frustum size &middot; c: cameras &middot; p: points &middot; r: reset view</div></div>
<div id="tip"></div>
<div id="err"></div>
<script type="application/json" id="scene">__SCENE_JSON__</script>
<script>
"use strict";
(function () {
  const body = document.body;
  function fail(e) {
    document.getElementById("err").textContent = "viewer error: " + (e && e.stack ? e.stack : e);
    body.dataset.error = String(e);
  }
  window.addEventListener("error", (ev) => fail(ev.error || ev.message));

  function bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function f32(s) { const b = bytes(s); return new Float32Array(b.buffer, 0, b.length >> 2); }
  function u16(s) { const b = bytes(s); return new Uint16Array(b.buffer, 0, b.length >> 1); }
  const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
  const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
  const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
  const scale = (a, s) => [a[0] * s, a[1] * s, a[2] * s];
  const add = (a, b) => [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
  const norm = (a) => { const n = Math.hypot(a[0], a[1], a[2]) || 1; return [a[0] / n, a[1] / n, a[2] / n]; };
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

  function main() {
    const S = JSON.parse(document.getElementById("scene").textContent);
    const comps = S.components;
    const P = f32(S.points.xyz), rgb = bytes(S.points.rgb), pcomp = u16(S.points.component);
    const N = pcomp.length;
    const pcol = new Uint32Array(N);  // ABGR, as ImageData's Uint32 view reads on little-endian
    for (let i = 0; i < N; i++) pcol[i] = 0xff000000 | (rgb[3 * i + 2] << 16) | (rgb[3 * i + 1] << 8) | rgb[3 * i];
    const cams = S.cameras, M = cams.names.length;
    const Cc = f32(cams.center), Cd = f32(cams.corners), ccomp = u16(cams.component);
    const visible = comps.map(() => true);

    document.getElementById("title").textContent = S.title;
    document.getElementById("stats").textContent =
      `${M} cameras, ${S.points.total} points` + (S.points.total > N ? ` (${N} shown)` : "");
    const legend = document.getElementById("legend");
    comps.forEach((c, k) => {
      const row = document.createElement("label");
      row.innerHTML = `<input type="checkbox" checked><span class="swatch" style="background:${c.color}"></span>` +
        `<span>${esc(c.name)} &mdash; ${c.images} images, ${c.points} points</span>`;
      row.querySelector("input").addEventListener("change", (ev) => { visible[k] = ev.target.checked; draw(true); });
      legend.appendChild(row);
    });

    const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
    const tip = document.getElementById("tip");
    const up = norm(S.view.up);
    let e1 = norm(sub(S.view.side, scale(up, dot(S.view.side, up))));
    const e2 = cross(up, e1);
    const fov = 50 * Math.PI / 180;
    let st = {}, pointSize = S.view.point_size, frScale = 1, showCams = true, showPoints = true, hover = -1;
    function reset() {
      st = {target: S.view.target.slice(), dist: S.view.distance, yaw: 0, pitch: S.view.pitch * Math.PI / 180};
    }
    reset();

    let W = 0, H = 0, dpr = 1, cache = null, camScreen = new Float32Array(2 * M), camOk = new Uint8Array(M);
    let eye, fw, rt, uu, focal;
    function setupView() {
      const cp = Math.cos(st.pitch);
      const dir = add(add(scale(e1, cp * Math.cos(st.yaw)), scale(e2, cp * Math.sin(st.yaw))), scale(up, Math.sin(st.pitch)));
      eye = add(st.target, scale(dir, st.dist));
      fw = norm(sub(st.target, eye));
      rt = norm(cross(fw, up));
      uu = cross(rt, fw);
      focal = 0.5 * H / Math.tan(fov / 2);
    }
    function resize() {
      dpr = window.devicePixelRatio || 1;
      W = Math.max(1, Math.round(window.innerWidth * dpr));
      H = Math.max(1, Math.round(window.innerHeight * dpr));
      canvas.width = W; canvas.height = H;
      draw(true);
    }

    let zb = null, img = null;
    // While the view moves, at most INTERACTIVE points are drawn (every k-th); all of them
    // once it rests.
    const INTERACTIVE = 60000;
    function renderPoints(stride) {
      if (!img || img.width !== W || img.height !== H) {
        img = ctx.createImageData(W, H);
        zb = new Float32Array(W * H);
      }
      const buf = new Uint32Array(img.data.buffer);
      buf.fill(0xff1b1614);
      if (!showPoints) return 0;
      zb.fill(Infinity);
      const ex = eye[0], ey = eye[1], ez = eye[2];
      const r0 = rt[0], r1 = rt[1], r2 = rt[2], u0 = uu[0], u1 = uu[1], u2 = uu[2], f0 = fw[0], f1 = fw[1], f2 = fw[2];
      const near = st.dist * 1e-3, ps = Math.max(1, Math.round(pointSize * dpr)), half = ps >> 1;
      const cx = W / 2 - half + 0.5, cy = H / 2 - half + 0.5;
      let drawn = 0;
      for (let i = 0; i < N; i += stride) {
        if (!visible[pcomp[i]]) continue;
        const dx = P[3 * i] - ex, dy = P[3 * i + 1] - ey, dz = P[3 * i + 2] - ez;
        const z = dx * f0 + dy * f1 + dz * f2;
        if (z < near) continue;
        const fz = focal / z;
        const sx = Math.floor(cx + fz * (dx * r0 + dy * r1 + dz * r2));
        const sy = Math.floor(cy - fz * (dx * u0 + dy * u1 + dz * u2));
        if (sx >= W || sy >= H || sx + ps <= 0 || sy + ps <= 0) continue;
        drawn++;
        const c = pcol[i];
        const x0 = sx < 0 ? 0 : sx, x1 = sx + ps > W ? W : sx + ps;
        const y1 = sy + ps > H ? H : sy + ps;
        for (let yy = sy < 0 ? 0 : sy; yy < y1; yy++) {
          for (let k = yy * W + x0, e = yy * W + x1; k < e; k++) {
            if (z < zb[k]) { zb[k] = z; buf[k] = c; }
          }
        }
      }
      return drawn;
    }

    function project(p) {
      const d = sub(p, eye), z = dot(d, fw);
      if (z < st.dist * 1e-3) return null;
      return [W / 2 + focal * dot(d, rt) / z, H / 2 - focal * dot(d, uu) / z];
    }

    function drawCameras() {
      let drawn = 0;
      camOk.fill(0);
      if (!showCams) return 0;
      ctx.lineWidth = Math.max(1, dpr);
      const paths = comps.map(() => new Path2D());
      let hi = null;
      for (let m = 0; m < M; m++) {
        if (!visible[ccomp[m]]) continue;
        const c = [Cc[3 * m], Cc[3 * m + 1], Cc[3 * m + 2]];
        const a = project(c);
        if (!a) continue;
        const q = [];
        for (let j = 0; j < 4; j++) {
          const o = 12 * m + 3 * j;
          const s = project([c[0] + frScale * Cd[o], c[1] + frScale * Cd[o + 1], c[2] + frScale * Cd[o + 2]]);
          if (!s) break;
          q.push(s);
        }
        camScreen[2 * m] = a[0]; camScreen[2 * m + 1] = a[1]; camOk[m] = 1;
        if (q.length < 4) continue;
        const path = m === hover ? (hi = new Path2D()) : paths[ccomp[m]];
        for (let j = 0; j < 4; j++) { path.moveTo(a[0], a[1]); path.lineTo(q[j][0], q[j][1]); }
        path.moveTo(q[0][0], q[0][1]);
        for (let j = 1; j <= 4; j++) path.lineTo(q[j % 4][0], q[j % 4][1]);
        // A small triangle on the top edge (image row 0) shows which way is up in the image.
        const mx = (q[0][0] + q[1][0]) / 2, my = (q[0][1] + q[1][1]) / 2;
        const ox = (q[0][0] + q[1][0] + q[2][0] + q[3][0]) / 4, oy = (q[0][1] + q[1][1] + q[2][1] + q[3][1]) / 4;
        path.moveTo(q[0][0] + (mx - q[0][0]) * 0.6, q[0][1] + (my - q[0][1]) * 0.6);
        path.lineTo(mx + (mx - ox) * 0.35, my + (my - oy) * 0.35);
        path.lineTo(q[1][0] + (mx - q[1][0]) * 0.6, q[1][1] + (my - q[1][1]) * 0.6);
        drawn++;
      }
      paths.forEach((p, k) => { ctx.strokeStyle = comps[k].color; ctx.stroke(p); });
      if (hi) { ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 2.5 * dpr; ctx.stroke(hi); }
      return drawn;
    }

    let moving = false, restTimer = 0;
    function draw(full) {
      if (!W) return;
      setupView();
      if (full || !cache) {
        const t0 = performance.now();
        const n = renderPoints(moving ? Math.max(1, Math.ceil(N / INTERACTIVE)) : 1);
        cache = img;
        if (!moving) body.dataset.drawnPoints = String(n);
        body.dataset.renderMs = (performance.now() - t0).toFixed(1);
      }
      ctx.putImageData(cache, 0, 0);
      body.dataset.drawnCameras = String(drawCameras());
      body.dataset.hover = String(hover);
      body.dataset.ready = "1";
    }
    let pending = false;
    function schedule(interactive) {
      moving = !!interactive;
      clearTimeout(restTimer);
      if (moving) restTimer = setTimeout(() => { if (!drag) { moving = false; schedule(false); } }, 150);
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(true); }); }
    }

    function pick(mx, my) {
      let best = -1, bd = (14 * dpr) ** 2;
      for (let m = 0; m < M; m++) {
        if (!camOk[m]) continue;
        const dx = camScreen[2 * m] - mx, dy = camScreen[2 * m + 1] - my, d = dx * dx + dy * dy;
        if (d < bd) { bd = d; best = m; }
      }
      return best;
    }
    function showTip(m, x, y) {
      if (m < 0) { tip.style.display = "none"; return; }
      const k = ccomp[m];
      let html = `<div class="name">${esc(cams.names[m])}</div><div class="sub">${esc(comps[k].name)} &middot; image_id ` +
        `${cams.image_ids[m]} &middot; ${cams.observations[m]} points &middot; ${esc(cams.models[m])}</div>`;
      if (cams.thumbnails && cams.thumbnails[m]) html += `<img src="${cams.thumbnails[m]}" alt="">`;
      tip.innerHTML = html;
      tip.style.display = "block";
      const place = () => {  // below-right of the pointer, flipped to the other side where it would not fit
        const w = tip.offsetWidth, h = tip.offsetHeight;
        const left = x + 14 + w <= window.innerWidth ? x + 14 : x - 14 - w;
        const top = y + 14 + h <= window.innerHeight ? y + 14 : y - 14 - h;
        tip.style.left = Math.max(4, left) + "px";
        tip.style.top = Math.max(4, top) + "px";
      };
      place();
      const im = tip.querySelector("img");
      if (im) im.addEventListener("load", place);  // its size is known only once decoded
    }

    let drag = null;
    canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
    canvas.addEventListener("mousedown", (ev) => {
      drag = {x: ev.clientX, y: ev.clientY, pan: ev.button === 2 || ev.shiftKey || ev.button === 1};
      canvas.classList.add("dragging");
      tip.style.display = "none";
    });
    window.addEventListener("mouseup", () => {
      if (drag) { drag = null; canvas.classList.remove("dragging"); schedule(false); }
    });
    window.addEventListener("mousemove", (ev) => {
      if (drag) {
        const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
        drag.x = ev.clientX; drag.y = ev.clientY;
        if (drag.pan) {
          const k = st.dist / focal * dpr;
          st.target = add(st.target, add(scale(rt, -dx * k), scale(uu, dy * k)));
        } else {
          st.yaw -= dx * 0.006;
          st.pitch = Math.max(-1.55, Math.min(1.55, st.pitch + dy * 0.006));
        }
        schedule(true);
        return;
      }
      if (ev.target !== canvas) return;
      const m = pick(ev.clientX * dpr, ev.clientY * dpr);
      if (m !== hover) { hover = m; draw(false); }
      showTip(m, ev.clientX, ev.clientY);
    });
    canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; if (hover >= 0) { hover = -1; draw(false); } });
    canvas.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      st.dist *= Math.exp(Math.max(-100, Math.min(100, ev.deltaY)) * 0.0015);
      schedule(true);
    }, {passive: false});
    canvas.addEventListener("dblclick", () => { reset(); schedule(); });
    window.addEventListener("keydown", (ev) => {
      const k = ev.key;
      if (k === "+" || k === "=") pointSize = Math.min(12, pointSize + 1);
      else if (k === "-" || k === "_") pointSize = Math.max(1, pointSize - 1);
      else if (k === "]") frScale *= 1.25;
      else if (k === "[") frScale /= 1.25;
      else if (k === "c") showCams = !showCams;
      else if (k === "p") showPoints = !showPoints;
      else if (k === "r") reset();
      else return;
      schedule();
    });
    window.addEventListener("resize", resize);
    resize();
    // For scripted checks (tests, screenshots): where camera m is drawn, in CSS pixels.
    window.torchsfmViewer = {
      cameraScreen: (m) => (camOk[m] ? [camScreen[2 * m] / dpr, camScreen[2 * m + 1] / dpr] : null),
      numCameras: M, numPoints: N,
    };
  }

  try { main(); } catch (e) { fail(e); }
})();
</script>
</body>
</html>
"""
