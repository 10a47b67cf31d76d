// Markdown -> HTML for model replies. Every character of the input is escaped before any markup
// is added, so nothing in a reply becomes an element the renderer did not make; links keep only
// http(s) and mailto targets. Covers what replies use: fenced code (an unclosed fence while a
// reply streams), headings, lists, quotes, rules, pipe tables, and inline code, bold, italic,
// strike-through and links.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const MAX_DEPTH = 8; // quotes within quotes: deeper ones are plain text

export function renderMarkdown(text, depth = 0) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const block = BLOCKS.find((b) => b.starts(lines, i, depth));
    if (block) {
      i = block.render(lines, i, out, depth);
    } else if (lines[i].trim() === "") {
      i += 1;
    } else {
      i = paragraph(lines, i, out, depth);
    }
  }
  return out.join("");
}

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

const BLOCKS = [
  { starts: (l, i) => FENCE.test(l[i]), render: codeBlock },
  { starts: (l, i) => HEADING.test(l[i]), render: heading },
  { starts: (l, i) => RULE.test(l[i]), render: (l, i, out) => (out.push("<hr>"), i + 1) },
  { starts: (l, i) => ITEM.test(l[i]), render: list },
  { starts: (l, i, depth) => depth < MAX_DEPTH && QUOTE.test(l[i]), render: quote },
  { starts: (l, i) => l[i].includes("|") && i + 1 < l.length && TABLE_RULE.test(l[i + 1]) && l[i + 1].includes("-"),
    render: table },
];

function codeBlock(lines, i, out) {
  const [, fence, lang] = lines[i].match(FENCE);
  const body = [];
  let j = i + 1;
  while (j < lines.length && !lines[j].trim().startsWith(fence)) body.push(lines[j++]);
  const label = lang ? `<span class="lang">${escapeHtml(lang)}</span>` : "";
  out.push(`<div class="code">${label}<button type="button" class="copy-code">Copy</button>` +
    `<pre><code>${escapeHtml(body.join("\n"))}</code></pre></div>`);
  return j + 1; // past the closing fence (or the end, for a fence still streaming)
}

function heading(lines, i, out) {
  const [, marks, title] = lines[i].match(HEADING);
  out.push(`<h${marks.length}>${inline(title.replace(/\s#+\s*$/, ""))}</h${marks.length}>`);
  return i + 1;
}

function list(lines, i, out) {
  const ordered = /\d/.test(lines[i].match(ITEM)[2]);
  const items = [];
  let j = i;
  while (j < lines.length) {
    const m = lines[j].match(ITEM);
    if (m && /\d/.test(m[2]) === ordered) {
      items.push(m[3]);
    } else if (lines[j].trim() !== "" && /^\s+/.test(lines[j]) && items.length) {
      items[items.length - 1] += "\n" + lines[j].trim(); // a continuation line of the item
    } else {
      break;
    }
    j += 1;
  }
  const tag = ordered ? "ol" : "ul";
  const start = ordered ? parseInt(lines[i].match(ITEM)[2], 10) : 1;
  const attr = ordered && start !== 1 ? ` start="${start}"` : "";
  out.push(`<${tag}${attr}>${items.map((t) => `<li>${inline(t)}</li>`).join("")}</${tag}>`);
  return j;
}

function quote(lines, i, out, depth) {
  const body = [];
  let j = i;
  while (j < lines.length && QUOTE.test(lines[j])) body.push(lines[j++].match(QUOTE)[1]);
  out.push(`<blockquote>${renderMarkdown(body.join("\n"), depth + 1)}</blockquote>`);
  return j;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => inline(c.trim()));
}

function table(lines, i, out) {
  const head = cells(lines[i]);
  let j = i + 2;
  const rows = [];
  while (j < lines.length && lines[j].includes("|") && lines[j].trim() !== "") rows.push(cells(lines[j++]));
  const row = (r, tag) => `<tr>${r.map((c) => `<${tag}>${c}</${tag}>`).join("")}</tr>`;
  out.push(`<table><thead>${row(head, "th")}</thead><tbody>${rows.map((r) => row(r, "td")).join("")}</tbody></table>`);
  return j;
}

function paragraph(lines, i, out, depth) {
  const body = [];
  let j = i;
  while (j < lines.length && lines[j].trim() !== "" && !BLOCKS.some((b) => b.starts(lines, j, depth))) body.push(lines[j++]);
  out.push(`<p>${body.map(inline).join("<br>")}</p>`);
  return j;
}

// Inline markup, on escaped text. Code spans and links are set aside first (as numbered
// placeholders) so that nothing inside them, and no markup they carry, is touched again.
export function inline(text) {
  const spans = [];
  const setAside = (html) => `\u0000${spans.push(html) - 1}\u0000`;
  const html = emphasis(escapeHtml(text.replace(/\u0000/g, ""))
    .replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, _ticks, code) => setAside(`<code>${code.trim()}</code>`))
    .replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, label, href) => {
      const built = link(label, href);
      return built === null ? whole : setAside(built);
    }));
  return html.replace(/\u0000(\d+)\u0000/g, (_, n) => spans[Number(n)]);
}

function emphasis(html) {
  return html
    .replace(/(\*\*|__)(?=\S)([\s\S]*?\S)\1/g, "<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?![_\w])/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}

function link(label, href) {
  // href is escaped text already: &amp; stands for &, and quotes cannot appear unescaped
  if (!/^(https?:\/\/|mailto:)/i.test(href)) return null;
  return `<a href="${href}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`;
}
