// A small SVG line chart with no dependencies: a live training loss curve, a device's memory and utilisation over
// time. lineChart(options) -> {node, update(series)}; series: [{name, points: [[x, y], ...]}]. The SVG carries a
// <title> and an aria-label that says the latest values, so the chart is not only visual.
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2b59c3", "#c3612b", "#1b7a3a", "#8a2bc3", "#b3261e"];

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function tidy(value) {
  if (!Number.isFinite(value)) return "–";
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  if (abs >= 1) return value.toFixed(2);
  return value.toPrecision(2);
}

// options: {title, xLabel, yLabel, yMin (default 0), yMax (fixed top; default: the data's), format(y) -> text,
// width, height, className}
export function lineChart(options = {}) {
  const width = options.width || 640;
  const height = options.height || 200;
  const pad = { left: 48, right: 12, top: 22, bottom: 34 };
  const format = options.format || tidy;
  const title = options.title || "Chart";
  const node = svg("svg", {
    class: `chart line-chart ${options.className || ""}`.trim(),
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": title,
    preserveAspectRatio: "xMidYMid meet",
  });
  const titleNode = svg("title", {}, title);
  const plot = svg("g", { class: "plot" });
  const legend = svg("g", { class: "legend" });
  node.append(titleNode, plot, legend);

  function update(series) {
    plot.replaceChildren();
    legend.replaceChildren();
    const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const innerW = width - pad.left - pad.right;
    const innerH = height - pad.top - pad.bottom;
    const yMin = options.yMin !== undefined ? options.yMin : Math.min(0, ...all.map(([, y]) => y));
    let yMax = options.yMax !== undefined ? options.yMax : all.length ? Math.max(...all.map(([, y]) => y)) : yMin + 1;
    if (!(yMax > yMin)) yMax = yMin + 1;
    const xs = all.map(([x]) => x);
    const xMin = xs.length ? Math.min(...xs) : 0;
    let xMax = xs.length ? Math.max(...xs) : 1;
    if (!(xMax > xMin)) xMax = xMin + 1;
    const px = (x) => pad.left + ((x - xMin) / (xMax - xMin)) * innerW;
    const py = (y) => pad.top + innerH - ((Math.min(Math.max(y, yMin), yMax) - yMin) / (yMax - yMin)) * innerH;

    // Axes and three horizontal grid lines with their values.
    for (let i = 0; i <= 2; i++) {
      const y = yMin + ((yMax - yMin) * i) / 2;
      plot.append(
        svg("line", { x1: pad.left, x2: width - pad.right, y1: py(y), y2: py(y), class: "grid", stroke: "#d9dde5" }),
        svg("text", { x: pad.left - 6, y: py(y) + 4, "text-anchor": "end", class: "tick", "font-size": 11, fill: "#5b6475" }, format(y)),
      );
    }
    plot.append(
      svg("line", { x1: pad.left, x2: pad.left, y1: pad.top, y2: pad.top + innerH, stroke: "#8893a8" }),
      svg("text", { x: pad.left, y: height - 8, "font-size": 11, fill: "#5b6475" }, xs.length ? tidy(xMin) : ""),
      svg("text", { x: width - pad.right, y: height - 8, "text-anchor": "end", "font-size": 11, fill: "#5b6475" }, xs.length ? tidy(xMax) : ""),
    );
    if (options.xLabel) {
      plot.append(svg("text", { x: pad.left + innerW / 2, y: height - 8, "text-anchor": "middle", "font-size": 11, fill: "#5b6475" }, options.xLabel));
    }
    if (options.yLabel) {
      plot.append(
        svg("text", { x: 12, y: pad.top + innerH / 2, "text-anchor": "middle", "font-size": 11, fill: "#5b6475", transform: `rotate(-90 12 ${pad.top + innerH / 2})` }, options.yLabel),
      );
    }
    const latest = [];
    series.forEach((s, index) => {
      const color = s.color || COLORS[index % COLORS.length];
      const points = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
      if (points.length) {
        const d = points.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
        plot.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series", "data-series": s.name, "data-points": points.length }));
        const [lx, ly] = points[points.length - 1];
        plot.append(svg("circle", { cx: px(lx), cy: py(ly), r: 3, fill: color }));
        latest.push(`${s.name} ${format(ly)}`);
      }
      const lx = width - pad.right - (series.length - index) * 130;
      legend.append(
        svg("rect", { x: lx, y: 2, width: 10, height: 10, fill: color }),
        svg("text", { x: lx + 14, y: 11, "font-size": 11, fill: "#1c2230" }, s.name),
      );
    });
    const summary = latest.length ? `${title}: latest ${latest.join(", ")}` : `${title}: no data yet`;
    node.setAttribute("aria-label", summary);
    titleNode.textContent = summary;
  }

  update([]);
  return { node, update };
}

// A rolling window of samples per key (a device's last `size` readings), for live charts.
export class History {
  constructor(size = 60) {
    this.size = size;
    this.data = new Map();
  }

  push(key, sample) {
    const list = this.data.get(key) || [];
    list.push(sample);
    if (list.length > this.size) list.splice(0, list.length - this.size);
    this.data.set(key, list);
    return list;
  }

  get(key) {
    return this.data.get(key) || [];
  }
}
