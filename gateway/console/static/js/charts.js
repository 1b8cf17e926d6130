// Small SVG charts drawn in the page (no library): a labelled 2-D scatter (the embedding map) and PCA to get there.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function dot(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i] * b[i];
  return sum;
}

function unit(v) {
  const norm = Math.sqrt(dot(v, v)) || 1;
  return v.map((x) => x / norm);
}

// The first two principal components of `vectors` (n rows of d numbers), by power iteration on the centred data
// (X^T X v, never forming the d x d covariance). Returns n points [x, y]; fewer than 2 distinct rows give zeros.
export function pca2(vectors) {
  const n = vectors.length;
  if (!n) return [];
  const d = vectors[0].length;
  const mean = new Array(d).fill(0);
  for (const row of vectors) for (let j = 0; j < d; j++) mean[j] += row[j] / n;
  const centred = vectors.map((row) => row.map((x, j) => x - mean[j]));
  const components = [];
  for (let c = 0; c < 2; c++) {
    // A deterministic start (so the map is the same each run), then X^T X v, less the earlier components.
    let v = unit(Array.from({ length: d }, (_, j) => Math.sin(j * 12.9898 + c * 78.233) + 0.5));
    for (let iter = 0; iter < 100; iter++) {
      const scores = centred.map((row) => dot(row, v));
      const next = new Array(d).fill(0);
      for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) next[j] += centred[i][j] * scores[i];
      for (const prev of components) {
        const along = dot(next, prev);
        for (let j = 0; j < d; j++) next[j] -= along * prev[j];
      }
      const norm = Math.sqrt(dot(next, next));
      if (norm < 1e-12) {
        v = new Array(d).fill(0);
        break;
      }
      const moved = next.map((x) => x / norm);
      const delta = Math.abs(1 - Math.abs(dot(moved, v)));
      v = moved;
      if (delta < 1e-10) break;
    }
    components.push(v);
  }
  return centred.map((row) => [dot(row, components[0]), dot(row, components[1])]);
}

// Cosine similarity of two vectors.
export function cosine(a, b) {
  return dot(a, b) / (Math.sqrt(dot(a, a) * dot(b, b)) || 1);
}

// A scatter of labelled points: an <svg class="chart"> with one <circle class="point"> per point and its label.
export function scatter(points, labels, { title = "Map", width = 640, height = 420 } = {}) {
  const pad = 24;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => (x1 > x0 ? pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad - 200) : width / 2 - 100);
  const sy = (y) => (y1 > y0 ? height - pad - ((y - y0) / (y1 - y0)) * (height - 2 * pad) : height / 2);
  const chart = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${title}: ${points.length} points`,
  });
  chart.append(svg("title", {}, title));
  // The axes through the centre of the data (PCA centres it on 0).
  const ox = x0 <= 0 && 0 <= x1 ? sx(0) : width / 2;
  const oy = y0 <= 0 && 0 <= y1 ? sy(0) : height / 2;
  chart.append(svg("line", { class: "axis", x1: pad, y1: oy.toFixed(1), x2: width - pad, y2: oy.toFixed(1) }));
  chart.append(svg("line", { class: "axis", x1: ox.toFixed(1), y1: pad, x2: ox.toFixed(1), y2: height - pad }));
  points.forEach((p, i) => {
    const label = labels[i] || "";
    const short = label.length > 32 ? `${label.slice(0, 31)}…` : label;
    const group = svg("g", { class: "point-group" });
    group.append(
      svg("circle", { class: "point", cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 6 }, svg("title", {}, label)),
      svg("text", { class: "point-label", x: (sx(p[0]) + 9).toFixed(1), y: (sy(p[1]) + 4).toFixed(1) }, short),
    );
    chart.append(group);
  });
  return chart;
}
